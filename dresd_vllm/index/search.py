"""Searching a datastore's index at serving time, on the CPU or a GPU.

A :class:`SearchIndex` holds one backend, each a small class with ``search(queries, k)`` (tensors
on the backend's device) and ``memory_bytes()``: FAISS on the CPU, FAISS on the GPU, exact search
by PyTorch (:class:`~dresd_vllm.index.torch_search.ExactTorch`), or IVF lists searched by PyTorch
(:class:`~dresd_vllm.index.torch_ivf.TorchIVF`) for GPUs whose CUDA has no FAISS build.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import faiss
import numpy as np
import torch

from dresd_vllm.index.build import ivf_of, read_keys
from dresd_vllm.index.torch_ivf import TorchIVF, fold_coarse, linear_transforms, spherical_kmeans
from dresd_vllm.index.torch_search import WORKSPACE_BYTES, ExactTorch

BACKENDS = ("auto", "faiss", "faiss-gpu", "torch", "torch-ivf")
# Datastore keys the coarse lists of a non-IVF datastore are trained on (for the online store).
_LIST_TRAIN_KEYS = 65_536


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How a datastore's index is searched: backend, device, IVF lists probed, HNSW depth, temporaries.

    ``nprobe``/``ef_search`` None keep the values stored with the index. ``workspace_bytes`` caps what
    one search allocates on its device besides its result (the torch backends search the batch in chunks).
    """

    backend: str = "auto"
    device: torch.device | str | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    workspace_bytes: int = WORKSPACE_BYTES

    @classmethod
    def of(cls, config: Any, device: torch.device | str | None = None) -> SearchOptions:
        """The options a serving config (``backend``, ``nprobe``, ``ef_search`` attributes) asks for."""
        return cls(backend=config.backend, device=device, nprobe=config.nprobe, ef_search=config.ef_search)


class Backend(Protocol):
    """What :class:`SearchIndex` searches with."""

    device: torch.device

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores float32 [B, k], ids int64 [B, k])``, -inf / -1 where nothing was found."""
        ...

    def memory_bytes(self) -> int:
        """Bytes of the searchable structure."""
        ...


class FaissBackend:
    """FAISS on the CPU; queries on another device are copied to the host first."""

    device = torch.device("cpu")

    def __init__(self, index: faiss.Index):
        """Search ``index`` as it is."""
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Backend.search`, on the CPU."""
        x = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        scores, ids = self.index.search(x, k)
        scores[ids < 0] = -np.inf
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def memory_bytes(self) -> int:
        """Bytes of the serialised index."""
        return int(faiss.serialize_index(self.index).size)


class FaissGpuBackend(FaissBackend):
    """FAISS's GPU index; it takes and returns host arrays, so its results are on the CPU."""

    def __init__(self, index: faiss.Index, device: torch.device):
        """Copy ``index`` to GPU ``device``."""
        if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
            raise ValueError("backend 'faiss-gpu' needs a FAISS GPU build and a GPU; use 'torch-ivf' or 'torch'")
        self._resources = faiss.StandardGpuResources()
        gpu_id = device.index if device.type == "cuda" and device.index is not None else 0
        super().__init__(faiss.index_cpu_to_gpu(self._resources, gpu_id, index))

    def memory_bytes(self) -> int:
        """Bytes of the index serialised from the GPU."""
        return int(faiss.serialize_index(faiss.index_gpu_to_cpu(self.index)).size)


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


class SearchIndex:
    """A loaded index and the backend that searches it (see :class:`SearchOptions`).

    :meth:`search_tensors` returns tensors on the backend's device (the served path packs them into
    one copy back); :meth:`search` returns NumPy arrays. ``index`` is the FAISS index searched (None
    for the torch backends, which keep only what they search); ``nprobe`` the IVF lists probed per
    query (None when not IVF or exact).

    On a GPU a workspace of ``workspace_bytes`` is allocated at load, so that vLLM's memory profile,
    which runs before the first step, counts it; the first search hands it to PyTorch's caching
    allocator, whose cached block the searches' temporaries then reuse.
    """

    def __init__(self, index: faiss.Index, options: SearchOptions | None = None):
        """Wrap a FAISS ``index``; ``options.nprobe``/``ef_search`` are set on it (None: the defaults)."""
        options = options or SearchOptions()
        backend = options.backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}, expected one of {BACKENDS}")
        self.device = torch.device(options.device) if options.device is not None else torch.device("cpu")
        ivf = ivf_of(index)
        if backend == "auto":
            backend = auto_backend(index, self.device)
        if backend == "torch-ivf" and ivf is None:
            raise ValueError(f"backend 'torch-ivf' needs an IVF index, not {type(index).__name__}; use 'torch'")
        self.backend = backend
        self.ntotal = index.ntotal
        self.dim = index.d
        _set_params(index, options.nprobe, options.ef_search)
        self.nprobe = ivf.nprobe if ivf is not None and backend != "torch" else None
        self.index: faiss.Index | None = None
        self._backend: Backend
        if backend == "torch":
            self._backend = ExactTorch(read_keys(index, device=self.device), options.workspace_bytes)
        elif backend == "torch-ivf":
            assert ivf is not None  # refused above
            self._backend = TorchIVF.from_faiss(index, self.device, ivf.nprobe, options.workspace_bytes)
        elif backend == "faiss-gpu":
            self._backend = FaissGpuBackend(index, self.device)
            self.index = self._backend.index
        else:
            self._backend = FaissBackend(index)
            self.index = index
        self.workspace_bytes = options.workspace_bytes
        on_gpu = self.device.type == "cuda" and backend in ("torch", "torch-ivf")
        self._workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=self.device) if on_gpu else None

    @classmethod
    def load(cls, path: str | os.PathLike, options: SearchOptions | None = None) -> SearchIndex:
        """Read a FAISS index file and prepare the backend ``options`` ask for."""
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as e:
            raise ValueError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0]})") from e
        return cls(index, options)

    def memory_bytes(self) -> int:
        """Bytes the searchable structure holds in memory (serialised index, or the torch key matrix or lists)."""
        return self._backend.memory_bytes()

    def search_tensors(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` by inner product for ``queries [B, d]``, as tensors on the backend's device.

        Returns ``(scores float32 [B, k], ids int64 [B, k])``, best first; where fewer than ``k``
        keys are found the missing ids are -1 and their scores -inf.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}], got {tuple(queries.shape)}")
        self._workspace = None  # from now on the caching allocator holds its block for the temporaries
        return self._backend.search(queries, k)

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search_tensors` as NumPy arrays on the host."""
        scores, ids = self.search_tensors(queries, k)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def coarse_map(self, nlist: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [d, n], bias [n])`` on the device: ``keys @ weight + bias`` scores ``n`` coarse lists.

        An IVF index's own trained lists (through its pre-transforms); for other indexes ``nlist`` lists
        trained by spherical k-means on a sample of the datastore's keys, which are drawn like the keys
        that a server will add.
        """
        backend = self._backend
        if isinstance(backend, TorchIVF):
            return backend.coarse_map()
        index = None
        if isinstance(backend, FaissBackend):
            index = faiss.index_gpu_to_cpu(backend.index) if isinstance(backend, FaissGpuBackend) else backend.index
            ivf = ivf_of(index)
            if ivf is not None:
                centroids = torch.from_numpy(ivf.quantizer.reconstruct_n(0, ivf.nlist)).to(self.device)
                chain = [(torch.from_numpy(a).to(self.device), torch.from_numpy(b).to(self.device))
                         for a, b in linear_transforms(index)]  # fmt: skip
                return fold_coarse(centroids, chain)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.ntotal, size=min(self.ntotal, _LIST_TRAIN_KEYS), replace=False))
        if isinstance(backend, ExactTorch):
            sample = backend.keys[torch.from_numpy(rows).to(backend.device)].to("cpu", torch.float32)
        else:
            assert index is not None  # neither torch backend: a FAISS one
            sample = read_keys(index, rows, "cpu", torch.float32)
        centroids = spherical_kmeans(sample, min(nlist, max(1, len(rows) // 8)), seed=seed)
        return centroids.T.contiguous().to(self.device), torch.zeros(centroids.shape[0], device=self.device)


def _set_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            params.set_index_parameter(index, name, int(value))
        except RuntimeError as e:
            raise ValueError(f"{name}={value} does not apply to a {type(index).__name__} index") from e
