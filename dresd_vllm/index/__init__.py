"""Search over keys: FAISS indexes (built and read) and the FAISS, exact-torch and torch-IVF backends."""
