"""IVF search with torch ops on any device: the GPU path that scales past exact search."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from dresd_vllm.index import ivf_of, read_keys


class TorchIVF:
    """An IVF index searched with torch ops on any device: the GPU path that scales past exact search.

    Holds the index's trained coarse centroids and its lists in list order: for IVF-PQ
    with 8-bit codes the codes themselves (searched by lookup tables, as FAISS does), for
    other IVF indexes the decoded keys (fp16 on a GPU). A query scores the centroids,
    takes the ``nprobe`` best lists and ranks every key in them; a linear pre-transform
    (OPQ) is applied to the queries first. Results match FAISS on the same index up to
    float rounding (ties may swap).
    """

    def __init__(self, index: faiss.Index, device: torch.device, nprobe: int):
        """Copy what search needs out of the FAISS ``index`` onto ``device``."""
        ivf = ivf_of(index)
        if ivf is None:
            raise ValueError(f"TorchIVF needs an IVF index, not {type(index).__name__}")
        self.device, self.nprobe = device, nprobe
        self._transform = _linear_transforms(index, device)
        self.centroids = torch.from_numpy(ivf.quantizer.reconstruct_n(0, ivf.nlist)).to(device)
        invlists = ivf.invlists
        assert invlists is not None  # faiss's stubs allow None; an IVF index always has its lists
        sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        ids = np.empty(int(sizes.sum()), dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(sizes)))
        inner = faiss.downcast_index(ivf)
        pq_ivf = inner if isinstance(inner, faiss.IndexIVFPQ) and inner.pq.nbits == 8 else None
        self._pq = pq_ivf is not None
        codes = np.empty((len(ids), ivf.code_size), dtype=np.uint8) if pq_ivf is not None else None
        for i in np.flatnonzero(sizes):
            ids[starts[i] : starts[i + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
            if codes is not None:
                raw = faiss.rev_swig_ptr(invlists.get_codes(int(i)), int(sizes[i]) * ivf.code_size)
                codes[starts[i] : starts[i + 1]] = raw.reshape(-1, ivf.code_size)
        self.sizes = torch.from_numpy(sizes).to(device)
        self.starts = torch.from_numpy(starts[:-1]).to(device)
        id_dtype = np.int32 if index.ntotal < 2**31 else np.int64  # 4 bytes a key where that is enough
        self.ids = torch.from_numpy(ids.astype(id_dtype)).to(device)
        if pq_ivf is not None and codes is not None:
            pq = pq_ivf.pq
            self.by_residual = bool(pq_ivf.by_residual)
            self.codebooks = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)).to(
                device
            )
            self.codes = torch.from_numpy(codes).to(device)
        else:
            self.keys = read_keys(ivf, ids, device)

    def memory_bytes(self) -> int:
        """Bytes held on the device: centroids, ids, and codes or keys."""
        tensors = [self.centroids, self.ids, self.sizes, self.starts]
        tensors += [self.codebooks, self.codes] if self._pq else [self.keys]
        return sum(t.numel() * t.element_size() for t in tensors)

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product, as :meth:`SearchIndex.search`."""
        q = queries.to(self.device, torch.float32)
        for weight, bias in self._transform:
            q = q @ weight.T + bias
        batch = q.shape[0]
        coarse, probe = torch.topk(q @ self.centroids.T, min(self.nprobe, self.centroids.shape[0]), dim=1)
        counts = self.sizes[probe]  # [B, P] keys in each probed list
        # One flat candidate list: segment s = (query, probe) holds keys starts[list] .. + counts.
        flat_counts = counts.reshape(-1)
        total = int(flat_counts.sum())
        seg = torch.repeat_interleave(
            torch.arange(flat_counts.numel(), device=self.device), flat_counts, output_size=total
        )
        within = torch.arange(total, device=self.device) - (torch.cumsum(flat_counts, 0) - flat_counts)[seg]
        src = self.starts[probe].reshape(-1)[seg] + within
        row = seg // probe.shape[1]
        col = (torch.cumsum(counts, 1) - counts).reshape(-1)[seg] + within
        if self._pq:
            m = self.codebooks.shape[0]
            luts = torch.einsum("bmd,mkd->bmk", q.view(batch, m, -1), self.codebooks).reshape(batch, -1)
            cells = self.codes[src].long() + torch.arange(m, device=self.device) * self.codebooks.shape[1]
            flat_scores = luts[row[:, None], cells].sum(dim=1)
            if self.by_residual:
                flat_scores = flat_scores + coarse.reshape(-1)[seg]
        else:
            flat_scores = (self.keys[src].float() * q[row]).sum(dim=1)
        width = int(counts.sum(dim=1).max()) if batch else 0
        scores = torch.full((batch, max(width, 1)), -torch.inf, device=self.device)
        scores[row, col] = flat_scores
        positions = torch.full((batch, max(width, 1)), -1, dtype=torch.long, device=self.device)
        positions[row, col] = src
        found = min(k, width)
        out_scores = np.full((batch, k), -np.inf, dtype=np.float32)
        out_ids = np.full((batch, k), -1, dtype=np.int64)
        if found:
            top, at = torch.topk(scores, found, dim=1)
            pos = positions.gather(1, at)
            ids = torch.where(torch.isfinite(top), self.ids[pos.clamp(min=0)].long(), -1)
            out_scores[:, :found] = top.cpu().numpy()
            out_ids[:, :found] = ids.cpu().numpy()
        return out_scores, out_ids


def _linear_transforms(index: faiss.Index, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(A, b)`` of each pre-transform (``x -> A x + b``) in front of the IVF index."""
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
        out.append((torch.from_numpy(weight).to(device), torch.from_numpy(bias).to(device)))
    return out
