"""Exact search with torch ops on any device: one GEMM and top-k, in chunks that fit a byte budget.

Shapes are fixed by the batch and by sizes known at load, so a search on a GPU needs no host
synchronisation; its temporaries stay under :data:`WORKSPACE_BYTES` by searching the queries (and
the keys) in chunks. The IVF search (:mod:`dresd_vllm.index.torch_ivf`) and the online store rank their
candidates with :func:`exact_search`. Needs torch only.
"""

from __future__ import annotations

import torch

# Bytes of temporaries one search may allocate on its device (see docs/retrieval.md).
WORKSPACE_BYTES = 256 << 20


def chunk_rows(per_row_bytes: int, budget: int) -> int:
    """Rows of a batch searched at once so that their temporaries stay within ``budget`` bytes (at least 1)."""
    return max(1, budget // max(per_row_bytes, 1))


def top_k(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best columns of ``scores [B, N]`` -> ``(float32 [B, k], positions int64 [B, k])``.

    Columns where ``valid`` is False never win; where fewer than ``k`` columns are valid, or ``N < k``,
    the missing scores are -inf and their positions -1. Shapes depend on ``B``, ``N`` and ``k`` only.
    """
    scores = scores.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
    found = min(k, scores.shape[1])
    top, pos = torch.topk(scores, found, dim=1)
    pos = pos.masked_fill(torch.isneginf(top), -1)  # masked_fill: where() with a scalar costs ~10x more
    if found < k:
        top = torch.nn.functional.pad(top, (0, k - found), value=-torch.inf)
        pos = torch.nn.functional.pad(pos, (0, k - found), value=-1)
    return top, pos


def exact_search(
    queries: torch.Tensor, keys: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` keys by inner product: one GEMM, then :func:`top_k`.

    ``keys`` is ``[N, d]`` (shared by every query) or ``[B, N, d]`` (each query's own candidates);
    ``valid`` (``[N]`` or ``[B, N]``) masks keys out. Returns ``(scores float32 [B, k], positions
    int64 [B, k])``, positions into ``keys``' N axis, -1 (score -inf) where nothing was found.
    """
    q = queries.to(keys.device, keys.dtype)
    if keys.ndim == 2:
        sims = q @ keys.T
    else:
        sims = torch.bmm(q[:, None, :], keys.transpose(1, 2)).squeeze(1)  # [b, 1, d] @ [b, d, N]: the faster layout
    if valid is not None and valid.ndim == 1:
        valid = valid[None, :]
    return top_k(sims, k, valid)


def merge_top_k(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of two ``(scores, ids)`` results of the same queries (a's entries first on ties)."""
    scores, ids = torch.cat([a[0], b[0]], dim=1), torch.cat([a[1], b[1]], dim=1)
    top, at = top_k(scores, k)
    return top, ids.gather(1, at.clamp(min=0)).masked_fill(at < 0, -1)


class ExactTorch:
    """Exact search over a ``[N, d]`` key matrix on its device (fp16 on a GPU, fp32 on the CPU)."""

    def __init__(self, keys: torch.Tensor, workspace_bytes: int = WORKSPACE_BYTES):
        """Search ``keys`` (ids are row numbers) with temporaries of at most ``workspace_bytes``."""
        self.keys = keys
        self.device = keys.device
        # A query's temporaries: its similarities (key dtype) and top-k's float copy.
        per_key = keys.element_size() + 8
        self._block = max(1, min(keys.shape[0], workspace_bytes // per_key))  # keys scored at once per query
        self._rows = chunk_rows(per_key * self._block, workspace_bytes)

    def memory_bytes(self) -> int:
        """Bytes of the key matrix."""
        return self.keys.numel() * self.keys.element_size()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores float32 [B, k], ids int64 [B, k])`` on the keys' device (-inf / -1 padded)."""
        results = []
        for start in range(0, queries.shape[0], self._rows):
            q = queries[start : start + self._rows]
            best: tuple[torch.Tensor, torch.Tensor] | None = None
            for first in range(0, self.keys.shape[0], self._block):
                scores, pos = exact_search(q, self.keys[first : first + self._block], k)
                found = scores, (pos + first).masked_fill(pos < 0, -1)
                best = found if best is None else merge_top_k(best, found, k)
            if best is None:  # no keys at all
                best = top_k(torch.empty((q.shape[0], 0), device=self.device), k)
            results.append(best)
        return cat_chunks(results, queries.shape[0], k, self.device)


def cat_chunks(
    results: list[tuple[torch.Tensor, torch.Tensor]], batch: int, k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks' ``(scores, ids)`` of one search, concatenated over the batch (``[batch, k]``)."""
    if len(results) == 1:
        return results[0]
    if not results:  # an empty batch
        return torch.empty((batch, k), device=device), torch.empty((batch, k), dtype=torch.long, device=device)
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
