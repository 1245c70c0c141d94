"""REST's proposer: drafts by exact suffix match in a corpus suffix array."""
