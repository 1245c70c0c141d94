"""OpenMP thread settings that do not leak out of the block that changes them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` OpenMP threads, then give the calling thread back its own setting.

    FAISS and torch share one OpenMP runtime when Intel OpenMP is preloaded, and the setting is the
    calling thread's: left at ``n``, it would also be the thread count of the model's next forward pass.
    ``None`` leaves the setting as it is.
    """
    if n is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
