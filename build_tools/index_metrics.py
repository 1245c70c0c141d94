"""Intrinsic evaluation of a datastore's index (used by ``dresd-build eval`` and ``dresd-bench retrieval``).

- recall@K: how many of the exact top-K neighbours the ANN index returns, on held-out states.
- self-retrieval MRR: query the index with stored keys and rank each key's own id,
  the figure the paper's ``index.py`` reports to check that the index finds what it holds.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from dresd_vllm.index.search import SearchIndex


def _as_queries(queries: np.ndarray | torch.Tensor) -> torch.Tensor:
    return queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))


def _search(index: SearchIndex | faiss.Index, queries: torch.Tensor, k: int) -> np.ndarray:
    if isinstance(index, SearchIndex):
        return index.search(queries, k)[1]
    return index.search(np.ascontiguousarray(queries.to("cpu", torch.float32).numpy()), k)[1]


def exact_neighbours(keys: np.ndarray, queries: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Exact top-``k`` ids by inner product of ``queries`` against ``keys [N, d]`` (FAISS brute force)."""
    q = np.ascontiguousarray(_as_queries(queries).to("cpu", torch.float32).numpy())
    _, ids = faiss.knn(q, np.ascontiguousarray(keys, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids


def recall_at_k(
    index: SearchIndex | faiss.Index,
    exact_index_or_keys: SearchIndex | faiss.Index | np.ndarray,
    queries: np.ndarray | torch.Tensor,
    k: int = 50,
) -> float:
    """Mean over queries of |ANN top-k ∩ exact top-k| / |exact top-k|.

    ``exact_index_or_keys`` is an exact index (``Flat`` or the torch backend) or the keys themselves.
    """
    queries = _as_queries(queries)
    found = _search(index, queries, k)
    if isinstance(exact_index_or_keys, np.ndarray):
        truth = exact_neighbours(exact_index_or_keys, queries, k)
    else:
        truth = _search(exact_index_or_keys, queries, k)
    hits = (found[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
    relevant = np.maximum((truth >= 0).sum(axis=1), 1)
    return float((hits.any(axis=1).sum(axis=1) / relevant).mean())


def self_retrieval_mrr(
    index: SearchIndex | faiss.Index,
    keys: np.ndarray,
    k: int = 50,
    sample_size: int = 1000,
    seed: int = 0,
) -> float:
    """Mean reciprocal rank of each sampled key's own id when the index is queried with that key.

    Ranks beyond ``k`` count 0. Exact duplicates of a key can outrank it, so a
    corpus with repeated text scores below 1 even with exact search.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(keys), size=min(sample_size, len(keys)), replace=False))
    found = _search(index, torch.from_numpy(np.asarray(keys[rows])), k)
    match = found == rows[:, None]
    rank = match.argmax(axis=1) + 1
    return float(np.where(match.any(axis=1), 1.0 / rank, 0.0).mean())
