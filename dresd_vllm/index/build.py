"""The ANN index over datastore keys: choosing, training, filling, sharding and reading it back.

Keys are unit fp16 vectors, so similarity is the inner product (cosine). The
index is a FAISS index described by a factory string; :mod:`dresd_vllm.index.search`
searches it at serving time.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from dresd_vllm.index.torch_ivf import nprobe_for

# Up to this many keys exact search (50k x 256 B scanned a query at d = 64) fits a decoding step's
# budget on one CPU core and loses nothing; above it IVF, which scans a few lists, is the faster.
FLAT_MAX_KEYS = 50_000
# Up to this many keys the keys are kept whole (fp16: 128 bytes a key, 8 more for its id); above
# it they are product-quantised (PQ_CODE, see auto_factory).
SQ_MAX_KEYS = 2_000_000
PQ_CODE = "PQ32"
# FAISS k-means warns below 39 training points per centroid; 64 trains centroids good enough for
# search in a quarter of the time of FAISS's own cap of 256.
_TRAIN_PER_CENTROID = 64
# HNSW's default efSearch (16) is below the paper's top_k = 50, which caps recall.
DEFAULT_EF_SEARCH = 128
_ADD_CHUNK = 1 << 18
_RECONSTRUCT_CHUNK = 1 << 18
# faiss's type stubs leave out DirectMap (SWIG has it).
_NO_MAP: int = faiss.DirectMap.NoMap  # type: ignore[attr-defined]


def auto_factory(num_keys: int) -> str:
    """The index the build uses when asked for ``"auto"``.

    ``Flat`` (exact) up to :data:`FLAT_MAX_KEYS` keys. Above that IVF with
    ``n ~ 4 sqrt(num_keys)`` lists rounded to a power of two (the FAISS guideline; at
    1e6 keys 4096 lists of ~250 keys). Up to :data:`SQ_MAX_KEYS` the lists hold the keys
    as fp16 (``SQfp16``): the keys are fp16 already (the projection rounds to fp16), so
    it is lossless, the same results as ``IVF{n},Flat`` at half the memory. Above it
    they hold product-quantisation codes (:data:`PQ_CODE`, a quarter of the fp16 size), which cost
    recall (docs/retrieval-at-scale.md); check a real store with ``dresd-build eval``.
    """
    if num_keys <= FLAT_MAX_KEYS:
        return "Flat"
    nlist = 1 << round(math.log2(4 * math.sqrt(num_keys)))
    return f"IVF{nlist},{'SQfp16' if num_keys <= SQ_MAX_KEYS else PQ_CODE}"


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
        ivf.nprobe = nprobe_for(ivf.nlist, ivf.ntotal)
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


def read_keys(
    index: faiss.Index,
    ids: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The keys ``index`` holds under ``ids`` (all, in id order, when None) as one ``[n, d]`` tensor.

    Read in chunks straight into the tensor on ``device`` (never one fp32 copy of all keys);
    approximate indexes (PQ) give back their decoded, approximate keys. ``dtype`` None: fp16 on
    a GPU, fp32 on the CPU (where fp16 GEMM is slow).
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    ivf = ivf_of(index)
    unmapped = ivf if ivf is not None and ivf.direct_map.type == _NO_MAP else None
    if unmapped is not None:
        unmapped.make_direct_map()  # IVF lists are not addressable by id without it
    n = index.ntotal if ids is None else len(ids)
    keys = torch.empty((n, index.d), dtype=dtype, device=device)
    for start in range(0, n, _RECONSTRUCT_CHUNK):
        end = min(start + _RECONSTRUCT_CHUNK, n)
        part = index.reconstruct_n(start, end - start) if ids is None else index.reconstruct_batch(ids[start:end])
        keys[start:end] = torch.from_numpy(part).to(device, dtype)
    if unmapped is not None:
        unmapped.set_direct_map_type(_NO_MAP)  # the map costs 8 bytes a key
    return keys
