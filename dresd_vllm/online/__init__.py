"""The online store: keys learned from served traffic, searched in memory and spooled to disk."""
