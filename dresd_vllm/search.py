"""Searching a datastore's index at serving time, on the CPU or a GPU.

FAISS on the CPU, FAISS on the GPU, exactly by PyTorch (one GEMM + top-k on the
queries' device), or IVF lists searched by PyTorch (:class:`TorchIVF`) for GPUs whose
CUDA has no FAISS build.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import torch

from dresd_vllm.index import ivf_of, read_keys
from dresd_vllm.torch_ivf import TorchIVF

BACKENDS = ("auto", "faiss", "faiss-gpu", "torch", "torch-ivf")


def auto_backend(index: faiss.Index, device: torch.device) -> str:
    """The backend ``"auto"`` means for ``index`` searched from ``device``.

    FAISS on the CPU. On a GPU a torch backend, never FAISS GPU: FAISS GPU wheels are
    built for other CUDA versions and GPU generations than vLLM's torch, and a fault
    there would mean silently no drafts. ``torch-ivf`` for IVF indexes (every ``auto``
    datastore above 50k keys), exact ``torch`` for the others.
    """
    if device.type != "cuda":
        return "faiss"
    return "torch-ivf" if ivf_of(index) is not None else "torch"


def _faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class SearchIndex:
    """A loaded index and the backend that searches it.

    ``search`` always returns NumPy arrays on the CPU, because the first-token
    filter and the merge that follow run in NumPy. ``index`` is the FAISS index
    searched (None for the torch backends, which keep only what they search);
    ``nprobe`` the IVF lists probed per query (None when not IVF or exact).

    ``backend="auto"`` is FAISS on the CPU and a torch backend on a GPU: ``torch-ivf``
    for IVF indexes (the datastores above 50k keys), exact ``torch`` for the rest.
    """

    def __init__(
        self,
        index: faiss.Index,
        backend: str = "auto",
        device: torch.device | str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        """Wrap a FAISS ``index``; ``nprobe``/``ef_search`` are set on it, None keeps its own setting."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}, expected one of {BACKENDS}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        ivf = ivf_of(index)
        if backend == "auto":
            backend = auto_backend(index, self.device)
        if backend == "faiss-gpu" and not _faiss_gpu_available():
            raise ValueError("backend 'faiss-gpu' needs a FAISS GPU build and a GPU; use 'torch-ivf' or 'torch'")
        if backend == "torch-ivf" and ivf is None:
            raise ValueError(f"backend 'torch-ivf' needs an IVF index, not {type(index).__name__}; use 'torch'")
        self.backend = backend
        self.ntotal = index.ntotal
        self.dim = index.d
        self._set_params(index, nprobe, ef_search)
        self.nprobe = ivf.nprobe if ivf is not None and backend != "torch" else None
        self._keys: torch.Tensor | None = None
        self._ivf: TorchIVF | None = None
        self.index: faiss.Index | None
        if backend == "torch":
            self._keys = read_keys(index, device=self.device)
            self.index = None  # the keys are all it needs: no second copy of the datastore in memory
        elif backend == "torch-ivf":
            assert ivf is not None  # refused above
            self._ivf = TorchIVF(index, self.device, ivf.nprobe)
            self.index = None
        elif backend == "faiss-gpu":
            gpu_id = self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu_id, index)
        else:
            self.index = index

    @staticmethod
    def _set_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
        params = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            if value is None:
                continue
            try:
                params.set_index_parameter(index, name, int(value))
            except RuntimeError as e:
                raise ValueError(f"{name}={value} does not apply to a {type(index).__name__} index") from e

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        backend: str = "auto",
        device: torch.device | str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchIndex:
        """Read a FAISS index file and prepare ``backend`` on ``device`` (see :class:`SearchIndex`)."""
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as e:
            raise ValueError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0]})") from e
        return cls(index, backend=backend, device=device, nprobe=nprobe, ef_search=ef_search)

    def memory_bytes(self) -> int:
        """Bytes the searchable structure holds in memory (serialised index, or the torch key matrix)."""
        if self._keys is not None:
            return self._keys.numel() * self._keys.element_size()
        if self._ivf is not None:
            return self._ivf.memory_bytes()
        assert self.index is not None  # neither torch backend: a FAISS one
        index = self.index if self.backend == "faiss" else faiss.index_gpu_to_cpu(self.index)
        return int(faiss.serialize_index(index).size)

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product for ``queries [B, d]``.

        Returns ``(scores float32 [B, k], ids int64 [B, k])``, best first; where
        fewer than ``k`` keys are found the missing ids are -1 and their scores -inf.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got {tuple(queries.shape)}")
        if self._keys is not None:
            return self._search_torch(self._keys, queries, k)
        if self._ivf is not None:
            return self._ivf.search(queries, k)
        assert self.index is not None  # neither torch backend: a FAISS one
        x = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        scores, ids = self.index.search(x, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    @staticmethod
    def _search_torch(keys: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = queries.to(keys.device, keys.dtype) @ keys.T
        found = min(k, keys.shape[0])
        top, idx = torch.topk(sims, found, dim=1)
        scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
        scores[:, :found] = top.float().cpu().numpy()
        ids[:, :found] = idx.cpu().numpy()
        return scores, ids
