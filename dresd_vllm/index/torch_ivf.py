"""An IVF index searched with torch ops on any device: the GPU path that scales past exact search.

A query scores the coarse centroids, takes its ``nprobe`` best lists and ranks every key in them with
:func:`~dresd_vllm.index.torch_search.exact_search` (or PQ lookup tables), in shapes fixed at load, so a
step on a GPU runs without a host synchronisation. FAISS is needed only to read a FAISS index
(:meth:`TorchIVF.from_faiss`): the GPU check runs this module on a machine without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dresd_vllm.index.torch_search import WORKSPACE_BYTES, cat_chunks, chunk_rows, exact_search, top_k

# Keys an IVF search scans by default (see nprobe_for).
SCAN_KEYS = 8192
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

        from dresd_vllm.index.build import ivf_of, read_keys

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
        return cat_chunks(results, q.shape[0], k, self.device)

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
