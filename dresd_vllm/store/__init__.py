"""The datastore on disk: its manifest, projection, reader and atomic writer."""
