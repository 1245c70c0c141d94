"""Search with torch ops on any device: one exact search, the IVF search built on it, and the copy back.

Everything here keeps its shapes fixed by the batch and by sizes known at load, so a step on a GPU
runs without a host synchronisation until the one copy back (:class:`HostCopy`), and its temporaries
stay under a byte budget by searching the queries in chunks. FAISS is needed only to read a FAISS
index (:meth:`TorchIVF.from_faiss`): the GPU check runs this module on a machine without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Keys an IVF search scans by default (see nprobe_for).
SCAN_KEYS = 8192
# Bytes of temporaries one search may allocate on its device (see docs/retrieval.md).
WORKSPACE_BYTES = 256 << 20
# Bytes of index temporaries per scanned candidate besides its key or codes: positions, segment, mask, score.
_PER_CANDIDATE = 48


def nprobe_for(nlist: int, num_keys: int) -> int:
    """Lists to probe so that a query scans about :data:`SCAN_KEYS` keys, and at least 16 lists.

    A fixed scan keeps latency flat as a store grows: at 1e6 keys (4096 lists) 34 lists; at 1e7 keys
    (16384 lists) 16 lists. Real hidden states may need more; ``dresd-build eval`` measures recall and
    the manifest's nprobe overrides this (docs/retrieval.md has the measured recall and latency).
    """
    per_list = max(num_keys, 1) / nlist
    return min(nlist, max(16, round(SCAN_KEYS / per_list)))


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
        return _cat(results, queries.shape[0], k, self.device)


class TorchIVF:
    """An IVF index searched with torch ops on any device: the GPU path that scales past exact search.

    Holds the coarse centroids and the lists in list order: for IVF-PQ with 8-bit codes the codes
    themselves (scored by lookup tables, as FAISS does), else the keys (fp16 on a GPU). A query scores
    the centroids, takes the ``nprobe`` best lists and ranks every key in them; a linear pre-transform
    (OPQ) is applied to the queries first. Results match FAISS on the same index up to float rounding
    (ties may swap). Each query scans a fixed ``[max_scan]`` candidate row (the ``nprobe`` largest lists'
    sizes, known at load), masked where its own lists are shorter: no shape depends on the data.
    """

    def __init__(
        self,
        centroids: np.ndarray,
        sizes: np.ndarray,
        ids: np.ndarray,
        device: torch.device | str,
        nprobe: int,
        *,
        keys: np.ndarray | torch.Tensor | None = None,
        codes: np.ndarray | None = None,
        codebooks: np.ndarray | None = None,
        by_residual: bool = False,
        transforms: Sequence[tuple[np.ndarray, np.ndarray]] = (),
        workspace_bytes: int = WORKSPACE_BYTES,
    ):
        """Lists in list order: ``sizes [nlist]``, ``ids [n]`` and either ``keys [n, d]`` or PQ ``codes [n, M]``
        with ``codebooks [M, 256, d / M]``; ``transforms`` are ``(A, b)`` applied as ``x -> x A^T + b``."""
        if (keys is None) == (codes is None):
            raise ValueError("TorchIVF needs either the lists' keys or their PQ codes")
        device = torch.device(device)
        self.device, self.nlist = device, len(sizes)
        self.nprobe = min(nprobe, self.nlist)
        self._transform = [(torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)) for a, b in transforms]
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
        sizes = np.asarray(sizes, dtype=np.int64)
        self.sizes = torch.from_numpy(sizes).to(device)
        self.starts = torch.from_numpy(np.cumsum(sizes) - sizes).to(device)
        # The longest candidate row a query can have: its nprobe lists are at most the nprobe largest.
        self.max_scan = int(np.sort(sizes)[::-1][: self.nprobe].sum())
        id_dtype = np.int32 if len(ids) < 2**31 else np.int64  # 4 bytes a key where that is enough
        self.ids = torch.from_numpy(np.asarray(ids).astype(id_dtype)).to(device)
        self._pq = codes is not None
        if codes is not None:
            assert codebooks is not None
            self.by_residual = by_residual
            self.codebooks = torch.from_numpy(np.ascontiguousarray(codebooks, dtype=np.float32)).to(device)
            self.codes = torch.from_numpy(np.ascontiguousarray(codes)).to(device)
            m = self.codebooks.shape[0]
            self._cell_offsets = torch.arange(m, device=device) * self.codebooks.shape[1]
            per_candidate = m * (1 + 8 + 4) + _PER_CANDIDATE  # codes, cell indices, looked-up scores
        else:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            self.keys = (
                keys.to(device, dtype) if isinstance(keys, torch.Tensor) else torch.from_numpy(keys).to(device, dtype)
            )
            per_candidate = self.keys.shape[1] * self.keys.element_size() + _PER_CANDIDATE
        self._rows = chunk_rows(per_candidate * max(self.max_scan, 1), workspace_bytes)

    @classmethod
    def from_faiss(
        cls, index: Any, device: torch.device | str, nprobe: int, workspace_bytes: int = WORKSPACE_BYTES
    ) -> TorchIVF:
        """Copy what search needs out of a FAISS IVF ``index`` onto ``device``."""
        import faiss  # only here: the rest of this module runs without FAISS

        from dresd_vllm.index import ivf_of, read_keys

        ivf = ivf_of(index)
        if ivf is None:
            raise ValueError(f"TorchIVF needs an IVF index, not {type(index).__name__}")
        invlists = ivf.invlists
        assert invlists is not None  # faiss's stubs allow None; an IVF index always has its lists
        sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        ids = np.empty(int(sizes.sum()), dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(sizes)))
        inner = faiss.downcast_index(ivf)
        pq_ivf = inner if isinstance(inner, faiss.IndexIVFPQ) and inner.pq.nbits == 8 else None
        codes = np.empty((len(ids), ivf.code_size), dtype=np.uint8) if pq_ivf is not None else None
        for i in np.flatnonzero(sizes):
            ids[starts[i] : starts[i + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
            if codes is not None:
                raw = faiss.rev_swig_ptr(invlists.get_codes(int(i)), int(sizes[i]) * ivf.code_size)
                codes[starts[i] : starts[i + 1]] = raw.reshape(-1, ivf.code_size)
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        transforms = linear_transforms(index)
        if pq_ivf is not None and codes is not None:
            pq = pq_ivf.pq
            codebooks = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
            return cls(
                centroids, sizes, ids, device, nprobe, codes=codes, codebooks=codebooks,
                by_residual=bool(pq_ivf.by_residual), transforms=transforms, workspace_bytes=workspace_bytes,
            )  # fmt: skip
        keys = read_keys(ivf, ids, device)
        return cls(
            centroids, sizes, ids, device, nprobe, keys=keys, transforms=transforms, workspace_bytes=workspace_bytes
        )

    def memory_bytes(self) -> int:
        """Bytes held on the device: centroids, ids, list starts and sizes, and codes or keys."""
        tensors = [self.centroids, self.ids, self.sizes, self.starts]
        tensors += [self.codebooks, self.codes] if self._pq else [self.keys]
        return sum(t.numel() * t.element_size() for t in tensors)

    def transform(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries in the lists' space (through the pre-transforms), float32 on the device."""
        q = queries.to(self.device, torch.float32)
        for weight, bias in self._transform:
            q = q @ weight.T + bias
        return q

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores float32 [B, k], ids int64 [B, k])`` on the device (-inf / -1 padded)."""
        q = self.transform(queries)
        results = [self._search(q[start : start + self._rows], k) for start in range(0, q.shape[0], self._rows)]
        return _cat(results, q.shape[0], k, self.device)

    def _search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        coarse, probe = torch.topk(q @ self.centroids.T, self.nprobe, dim=1)  # [b, P]
        counts = self.sizes[probe]
        ends = torch.cumsum(counts, dim=1)
        # Candidate c of a query lies in its probed list j, the first whose running end exceeds c.
        col = torch.arange(self.max_scan, device=self.device).expand(q.shape[0], -1).contiguous()
        seg = torch.searchsorted(ends, col, right=True)  # [b, S]; nprobe where the query's lists have ended
        valid = seg < self.nprobe
        seg = seg.clamp(max=self.nprobe - 1)
        src = (self.starts[probe] - (ends - counts)).gather(1, seg) + col  # list start + position in the list
        src = src.masked_fill(~valid, 0)
        if self._pq:
            m = self.codebooks.shape[0]
            luts = torch.einsum("bmd,mkd->bmk", q.view(q.shape[0], m, -1), self.codebooks).reshape(q.shape[0], -1)
            codes = self.codes.index_select(0, src.reshape(-1)).view(*src.shape, -1)
            cells = codes.long() + self._cell_offsets  # [b, S, M] rows of the flattened tables
            scores = luts.gather(1, cells.view(q.shape[0], -1)).view(cells.shape).sum(dim=2)
            if self.by_residual:
                scores = scores + coarse.gather(1, seg)
            top, pos = top_k(scores, k, valid)
        else:
            keys = self.keys.index_select(0, src.reshape(-1)).view(*src.shape, -1)
            top, pos = exact_search(q, keys, k, valid)
        ids = self.ids[src.gather(1, pos.clamp(min=0))].long()
        return top, ids.masked_fill(pos < 0, -1)

    def coarse_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [d, nlist], bias [nlist])``: ``keys @ weight + bias`` scores the lists (:func:`fold_coarse`)."""
        return fold_coarse(self.centroids, self._transform)


def fold_coarse(
    centroids: torch.Tensor, transforms: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [d, nlist], bias [nlist])`` with ``x @ weight + bias == T(x) @ centroids.T``.

    ``T`` is the chain of linear pre-transforms ``x -> x A^T + b`` in front of the lists, so a key is
    assigned to its IVF list in its own space, with one GEMM.
    """
    weight = centroids.T
    bias = torch.zeros(centroids.shape[0], device=centroids.device)
    for a, b in reversed(transforms):  # T(x) @ W + c = (x A^T + b) @ W + c = x (A^T W) + (b @ W + c)
        bias = b @ weight + bias
        weight = a.T @ weight
    return weight.contiguous(), bias


def linear_transforms(index: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(A, b)`` of each pre-transform (``x -> A x + b``) in front of a FAISS IVF index."""
    import faiss

    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexPreTransform):
        return []
    out = []
    chain: Any = outer.chain  # a SWIG vector (size, at), which faiss's stubs call a list
    for i in range(chain.size()):
        vt = faiss.downcast_VectorTransform(chain.at(i))
        if not isinstance(vt, faiss.LinearTransform):
            raise ValueError(f"torch-ivf supports linear pre-transforms (OPQ, PCA), not {type(vt).__name__}")
        weight = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
        bias = faiss.vector_to_array(vt.b) if vt.have_bias else np.zeros(vt.d_out, dtype=np.float32)
        out.append((weight, bias))
    return out


def spherical_kmeans(x: torch.Tensor, n: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """``n`` unit centroids of the unit rows ``x [N, d]`` (inner-product k-means, seeded from a sample)."""
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:n].to(x.device)].float()
    rows = max(1, (1 << 26) // n)  # similarities of this many rows at a time: 256 MB of fp32
    for _ in range(iters):
        sums = torch.zeros_like(centroids)
        for start in range(0, x.shape[0], rows):
            chunk = x[start : start + rows].float()
            sums.index_add_(0, (chunk @ centroids.T).argmax(dim=1), chunk)
        empty = sums.norm(dim=1) == 0
        centroids = torch.where(empty[:, None], centroids, torch.nn.functional.normalize(sums, dim=1))
    return centroids


def _cat(
    results: list[tuple[torch.Tensor, torch.Tensor]], batch: int, k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(results) == 1:
        return results[0]
    if not results:  # an empty batch
        return torch.empty((batch, k), device=device), torch.empty((batch, k), dtype=torch.long, device=device)
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
}


class HostCopy:
    """The one device-to-host copy of a step: several device tensors packed into one transfer.

    On a GPU the tensors' bytes are concatenated on the device and copied without blocking into a
    pinned buffer kept between steps; the host then waits on an event for that copy alone (a wait
    that ``torch.cuda.set_sync_debug_mode`` does not count as a synchronising call). On the CPU the
    tensors are the arrays already. ``copies`` counts the transfers made.
    """

    def __init__(self) -> None:
        self._pinned: torch.Tensor | None = None
        self.copies = 0

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """NumPy copies of ``tensors`` (CPU or one device), after at most one transfer."""
        self.copies += 1
        on_device = [t.device.type != "cpu" for t in tensors]
        if not any(on_device):
            return [t.detach().numpy() for t in tensors]
        moved = [t for t, d in zip(tensors, on_device, strict=True) if d]
        packed = pack_bytes(moved)
        if packed.device.type != "cuda":  # no pinned memory to copy into without blocking: one plain copy
            raw = packed.cpu().numpy()
        else:
            if self._pinned is None or self._pinned.numel() < packed.numel():
                self._pinned = torch.empty(2 * packed.numel(), dtype=torch.uint8, pin_memory=True)
            host = self._pinned[: packed.numel()]
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
            raw = host.numpy()
        unpacked = iter(unpack_bytes(moved, raw))
        return [next(unpacked) if d else t.detach().numpy() for t, d in zip(tensors, on_device, strict=True)]


def pack_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bytes of ``tensors`` (one device), one after the other, as one uint8 tensor on that device."""
    return torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in tensors])


def unpack_bytes(tensors: Sequence[torch.Tensor], raw: np.ndarray) -> list[np.ndarray]:
    """Arrays shaped and typed like ``tensors`` from ``raw``, the bytes :func:`pack_bytes` made of them."""
    out: list[np.ndarray] = []
    offset = 0
    for t in tensors:
        size = t.numel() * t.element_size()
        out.append(raw[offset : offset + size].view(_NUMPY[t.dtype]).reshape(t.shape).copy())
        offset += size
    return out
