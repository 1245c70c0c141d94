"""The ANN index over datastore keys and the backends that search it.

Keys are unit fp16 vectors, so similarity is the inner product (cosine). The
index is a FAISS index described by a factory string; at load time it is
searched by FAISS on the CPU, by FAISS on the GPU, or exactly by PyTorch (one
GEMM + top-k on the queries' device) for GPUs whose CUDA has no FAISS build.
"""

from __future__ import annotations

import math
import os

import faiss
import numpy as np
import torch

BACKENDS = ("auto", "faiss", "faiss-gpu", "torch", "torch-ivf")

# Up to this many keys exact search costs at most ~1 ms per query on one CPU core
# (d = 64: 50k x 256 B scanned) and loses nothing; above it IVF is ~10x faster.
FLAT_MAX_KEYS = 50_000
# Up to this many keys the keys are kept whole (fp16, 136 bytes a key with its id: 270 MB at
# 2M keys); above it they are product-quantised (PQ_CODE, see auto_factory).
SQ_MAX_KEYS = 2_000_000
PQ_CODE = "PQ32"
# Keys an IVF search scans by default (see nprobe_for).
SCAN_KEYS = 8192
# FAISS k-means warns below 39 training points per centroid; 64 gives centroids as
# good for search as FAISS's own cap of 256 at a quarter of the training time.
_TRAIN_PER_CENTROID = 64
# HNSW's default efSearch (16) is below the paper's top_k = 50, which caps recall.
DEFAULT_EF_SEARCH = 128
_ADD_CHUNK = 1 << 18
_RECONSTRUCT_CHUNK = 1 << 18


def auto_factory(num_keys: int) -> str:
    """The index the build uses when asked for ``"auto"``.

    ``Flat`` (exact) up to :data:`FLAT_MAX_KEYS` keys. Above that IVF with
    ``n ~ 4 sqrt(num_keys)`` lists rounded to a power of two (the FAISS guideline; at
    1e6 keys 4096 lists of ~250 keys). Up to :data:`SQ_MAX_KEYS` the lists hold the keys
    as fp16 (``SQfp16``): the keys are fp16 already (the projection rounds to fp16), so
    it is lossless, the same results as ``IVF{n},Flat`` at half the memory. Above it
    they hold product-quantisation codes (:data:`PQ_CODE`, a quarter of the fp16 size: 44 bytes
    a key with id and offset). On the retrieval benchmark's states PQ32 gave recall@50 0.86-0.91
    (0.73 for PQ16); check a real store with ``dresd-build eval``.
    """
    if num_keys <= FLAT_MAX_KEYS:
        return "Flat"
    nlist = 1 << round(math.log2(4 * math.sqrt(num_keys)))
    return f"IVF{nlist},{'SQfp16' if num_keys <= SQ_MAX_KEYS else PQ_CODE}"


def default_nprobe(index: faiss.Index) -> int | None:
    """The nprobe the build stores with an IVF index; None for other indexes (see :func:`nprobe_for`)."""
    ivf = ivf_of(index)
    return None if ivf is None else nprobe_for(ivf.nlist, ivf.ntotal)


def nprobe_for(nlist: int, num_keys: int) -> int:
    """Lists to probe so that a query scans about :data:`SCAN_KEYS` keys, and at least 16 lists.

    A fixed scan keeps latency flat as a store grows: at 1e6 keys (4096 lists) 34 lists,
    ~0.2 ms on one CPU core with recall@50 0.998 on the retrieval benchmark's synthetic
    states; at 1e7 keys (16384 lists) 16 lists. Real hidden states may need more;
    ``dresd-build eval`` measures recall and the manifest's nprobe overrides this.
    """
    per_list = max(num_keys, 1) / nlist
    return min(nlist, max(16, round(SCAN_KEYS / per_list)))


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index that ``index`` is or wraps (e.g. under a pre-transform), or None."""
    return faiss.try_extract_index_ivf(index)


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string (ValueError if it is not one)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e
    # The factory turns polysemous training on for PQ; it costs minutes of training and helps
    # only Hamming-filtered search, which nothing here uses.
    ivf = ivf_of(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    return index


def train_rows(num_keys: int, index: faiss.Index, seed: int = 0) -> np.ndarray:
    """The sorted key rows an untrained ``index`` is trained on (empty if it needs no training).

    A seeded sample: :data:`_TRAIN_PER_CENTROID` per IVF list, or 65536 without IVF
    (FAISS's PQ k-means uses at most 256 * 256 points).
    """
    if index.is_trained:
        return np.empty(0, dtype=np.int64)
    ivf = ivf_of(index)
    max_train = _TRAIN_PER_CENTROID * ivf.nlist if ivf is not None else 256 * 256
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_keys, size=min(num_keys, max_train), replace=False))


def train_index(index: faiss.Index, sample: np.ndarray, seed: int = 0) -> None:
    """Train ``index`` on the keys ``sample`` (the rows :func:`train_rows` chose), in place."""
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.cp.seed = seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def add_keys(index: faiss.Index, keys: np.ndarray, first_id: int) -> None:
    """Add ``keys`` as ids ``first_id, first_id + 1, ...`` in chunks (never one fp32 copy of all keys).

    Only IVF indexes store ids; the others number keys by position, so ``first_id`` must
    then be ``index.ntotal``.
    """
    ivf = ivf_of(index)
    if ivf is None and first_id != index.ntotal:
        raise ValueError(f"a {type(index).__name__} index numbers keys by position: first_id must be {index.ntotal}")
    for start in range(0, len(keys), _ADD_CHUNK):
        chunk = np.ascontiguousarray(keys[start : start + _ADD_CHUNK], dtype=np.float32)
        if ivf is not None:
            index.add_with_ids(chunk, np.arange(first_id + start, first_id + start + len(chunk), dtype=np.int64))
        else:
            index.add(chunk)


def set_search_defaults(index: faiss.Index) -> None:
    """Store working nprobe / efSearch in the index (FAISS writes them into the index file)."""
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = default_nprobe(index)
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        hnsw.hnsw.efSearch = DEFAULT_EF_SEARCH


def build_index(keys: np.ndarray, factory: str = "auto", seed: int = 0) -> faiss.Index:
    """Train (if needed) and fill an inner-product FAISS index with ``keys [N, d]`` in one process.

    ``factory`` is a FAISS factory string (``Flat``, ``IVF{n},Flat``,
    ``IVF{n},PQ{m}``, ``HNSW{m}``, ...) or ``"auto"`` (:func:`auto_factory`).
    """
    keys = np.asarray(keys)
    if keys.ndim != 2:
        raise ValueError(f"keys must be [N, d], got shape {keys.shape}")
    num_keys, dim = keys.shape
    index = new_index(dim, auto_factory(num_keys) if factory == "auto" else factory)
    rows = train_rows(num_keys, index, seed)
    if len(rows):
        train_index(index, keys[rows], seed)
    add_keys(index, keys, 0)
    set_search_defaults(index)
    return index


def mergeable(index: faiss.Index) -> bool:
    """Whether shards encoded apart can be merged into ``index`` (IVF and flat-code indexes; not HNSW)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return ivf_of(index) is not None or isinstance(inner, faiss.IndexFlatCodes)


def empty_copy(index: faiss.Index) -> faiss.Index:
    """A trained copy of ``index`` holding no keys: what shards are encoded into."""
    copy = _as_read(index)
    copy.reset()
    return copy


def _as_read(index: faiss.Index) -> faiss.Index:
    # A copy through the file format, so that every copy has the class a worker reading it gets
    # (the factory's IndexFlat reads back as IndexFlatIP, and FAISS merges only equal classes).
    return faiss.deserialize_index(faiss.serialize_index(index))


def encode_shard(trained: faiss.Index, keys: np.ndarray, first_id: int) -> faiss.Index:
    """Keys ``first_id ..`` encoded into an empty copy of the trained (empty) index ``trained``.

    Each key's code depends only on the key and the trained quantisers, so shards encoded
    anywhere and merged in order (:func:`merge_shard`) equal one index filled in order.
    """
    shard = _as_read(trained)
    add_keys(shard, keys, first_id if ivf_of(shard) is not None else 0)
    return shard


def merge_shard(index: faiss.Index, shard: faiss.Index) -> None:
    """Append the keys of ``shard`` (from :func:`encode_shard`) to ``index``, in place."""
    # IVF shards carry their global ids; flat-code indexes number keys by position.
    index.merge_from(shard, 0)


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
            self._keys = _reconstruct_all(index, self.device)
            self.index = None  # the keys are all it needs: no second copy of the datastore in memory
        elif backend == "torch-ivf":
            self._ivf = TorchIVF(index, self.device, self.nprobe)
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
            return self._search_torch(queries, k)
        if self._ivf is not None:
            return self._ivf.search(queries, k)
        x = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        scores, ids = self.index.search(x, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_torch(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        keys = self._keys
        sims = queries.to(keys.device, keys.dtype) @ keys.T
        found = min(k, keys.shape[0])
        top, idx = torch.topk(sims, found, dim=1)
        scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
        scores[:, :found] = top.float().cpu().numpy()
        ids[:, :found] = idx.cpu().numpy()
        return scores, ids


def _reconstruct_all(index: faiss.Index, device: torch.device) -> torch.Tensor:
    """All keys as one tensor on ``device``: fp16 on a GPU; fp32 on the CPU, where fp16 GEMM is slow.

    Approximate indexes (PQ) give back their decoded, approximate keys.
    """
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.make_direct_map()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    keys = torch.empty((index.ntotal, index.d), dtype=dtype, device=device)
    for start in range(0, index.ntotal, _RECONSTRUCT_CHUNK):
        n = min(_RECONSTRUCT_CHUNK, index.ntotal - start)
        keys[start : start + n] = torch.from_numpy(index.reconstruct_n(start, n)).to(device, dtype)
    return keys


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
        sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        ids = np.empty(int(sizes.sum()), dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(sizes)))
        inner = faiss.downcast_index(ivf)
        self._pq = isinstance(inner, faiss.IndexIVFPQ) and inner.pq.nbits == 8
        codes = np.empty((len(ids), ivf.code_size), dtype=np.uint8) if self._pq else None
        for i in np.flatnonzero(sizes):
            ids[starts[i] : starts[i + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
            if codes is not None:
                raw = faiss.rev_swig_ptr(invlists.get_codes(int(i)), int(sizes[i]) * ivf.code_size)
                codes[starts[i] : starts[i + 1]] = raw.reshape(-1, ivf.code_size)
        self.sizes = torch.from_numpy(sizes).to(device)
        self.starts = torch.from_numpy(starts[:-1]).to(device)
        id_dtype = np.int32 if index.ntotal < 2**31 else np.int64  # 4 bytes a key where that is enough
        self.ids = torch.from_numpy(ids.astype(id_dtype)).to(device)
        if codes is not None:
            pq = inner.pq
            self.by_residual = bool(inner.by_residual)
            self.codebooks = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)).to(
                device
            )
            self.codes = torch.from_numpy(codes).to(device)
        else:
            self.keys = _reconstruct_ids(ivf, ids, device)

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
    for i in range(outer.chain.size()):
        vt = faiss.downcast_VectorTransform(outer.chain.at(i))
        if not isinstance(vt, faiss.LinearTransform):
            raise ValueError(f"torch-ivf supports linear pre-transforms (OPQ, PCA), not {type(vt).__name__}")
        weight = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
        bias = faiss.vector_to_array(vt.b) if vt.have_bias else np.zeros(vt.d_out, dtype=np.float32)
        out.append((torch.from_numpy(weight).to(device), torch.from_numpy(bias).to(device)))
    return out


def _reconstruct_ids(ivf: faiss.IndexIVF, ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """The IVF index's decoded keys of ``ids``, in that order (fp16 on a GPU, fp32 on the CPU)."""
    ivf.make_direct_map()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    keys = torch.empty((len(ids), ivf.d), dtype=dtype, device=device)
    for start in range(0, len(ids), _RECONSTRUCT_CHUNK):
        part = ids[start : start + _RECONSTRUCT_CHUNK]
        keys[start : start + len(part)] = torch.from_numpy(ivf.reconstruct_batch(part)).to(device, dtype)
    ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    return keys
