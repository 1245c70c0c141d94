"""The index: every factory type against exact search, the torch backend, load-time parameters, errors."""

import faiss
import numpy as np
import pytest
import torch

from build_tools.index_metrics import exact_neighbours, recall_at_k, self_retrieval_mrr
from dresd_vllm.index.build import (
    PQ_CODE,
    auto_factory,
    build_index,
    empty_copy,
    encode_shard,
    merge_shard,
    mergeable,
    new_index,
    nprobe_for,
    set_search_defaults,
    train_index,
    train_rows,
)
from dresd_vllm.index.search import SearchIndex, SearchOptions, auto_backend

D = 64


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray, latent: np.ndarray) -> np.ndarray:
    """Unit fp16 keys: cluster centre + low-rank offset + a little noise (like projected LLM states)."""
    z = rng.standard_normal((n, latent.shape[0]))
    x = centres[rng.integers(0, len(centres), n)] + z @ latent + 0.05 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, D))
    latent = 0.7 * rng.standard_normal((16, D)) / 4
    return clustered(8000, rng, centres, latent), clustered(100, rng, centres, latent)


def test_auto_factory():
    assert auto_factory(1_000) == "Flat"
    assert auto_factory(50_000) == "Flat"
    assert auto_factory(200_000) == "IVF2048,SQfp16"
    assert auto_factory(1_000_000) == "IVF4096,SQfp16"
    assert auto_factory(2_000_000) == "IVF4096,SQfp16"
    assert auto_factory(2_000_001) == f"IVF4096,{PQ_CODE}"  # compact codes above a few million keys
    assert auto_factory(10_000_000) == f"IVF16384,{PQ_CODE}"


@pytest.mark.parametrize(
    "factory, params, min_recall",
    [
        ("Flat", {}, 1.0),
        ("IVF64,Flat", {"nprobe": 4}, 0.9),
        ("IVF64,SQfp16", {"nprobe": 4}, 0.9),
        ("IVF64,PQ64x4", {"nprobe": 4}, 0.9),
        ("HNSW32", {}, 0.9),
    ],
)
def test_recall_at_50_against_exact(data, factory, params, min_recall):
    keys, queries = data
    index = build_index(keys, factory)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and index.ntotal == len(keys)
    search = SearchIndex(index, SearchOptions(**params))
    assert search.backend == "faiss"
    assert recall_at_k(search, keys, torch.from_numpy(queries), 50) >= min_recall
    scores, ids = search.search(torch.from_numpy(queries), 50)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (100, 50)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_auto_build_sets_search_defaults(data):
    keys, _ = data
    assert SearchIndex(build_index(keys, "IVF64,Flat")).nprobe == 64  # 8000 keys: scan them all
    assert nprobe_for(4096, 1_000_000) == 34 and nprobe_for(16384, 10_000_000) == 16
    assert nprobe_for(16384, 10**9) == 16 and nprobe_for(8, 10**6) == 8  # at least 16, at most every list
    hnsw = faiss.downcast_index(build_index(keys[:500], "HNSW16"))
    assert hnsw.hnsw.efSearch >= 50  # FAISS's default 16 would cap recall at top_k = 50


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat", "HNSW16"])
def test_torch_backend_is_exact(data, factory):
    keys, queries = data
    search = SearchIndex(build_index(keys, factory), SearchOptions(backend="torch"))
    assert search.backend == "torch" and search.index is None and search.nprobe is None  # keys only
    scores, ids = search.search(torch.from_numpy(queries), 10)
    np.testing.assert_array_equal(ids, exact_neighbours(keys, queries, 10))
    expected = queries.astype(np.float32) @ keys[ids[0]].astype(np.float32).T
    np.testing.assert_allclose(scores[0], expected[0], atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_fewer_keys_than_k(data, backend):
    keys, queries = data
    scores, ids = SearchIndex(build_index(keys[:5], "Flat"), SearchOptions(backend=backend)).search(
        torch.from_numpy(queries[:2]), 8
    )
    assert np.all(ids[:, :5] >= 0) and np.all(ids[:, 5:] == -1)
    assert np.all(np.isneginf(scores[:, 5:])) and np.all(np.isfinite(scores[:, :5]))


def test_nprobe_and_ef_search_at_load(data, tmp_path):
    keys, _ = data
    faiss.write_index(build_index(keys, "IVF32,Flat"), str(tmp_path / "ivf.faiss"))
    assert SearchIndex.load(tmp_path / "ivf.faiss").nprobe == 32  # stored with the index
    assert SearchIndex.load(tmp_path / "ivf.faiss", SearchOptions(nprobe=3)).nprobe == 3
    faiss.write_index(build_index(keys[:500], "HNSW16"), str(tmp_path / "hnsw.faiss"))
    hnsw = SearchIndex.load(tmp_path / "hnsw.faiss", SearchOptions(ef_search=77))
    assert faiss.downcast_index(hnsw.index).hnsw.efSearch == 77
    with pytest.raises(ValueError, match="nprobe=4 does not apply to a IndexHNSWFlat"):
        SearchIndex.load(tmp_path / "hnsw.faiss", SearchOptions(nprobe=4))


def test_bad_backend_and_factory(data):
    keys, _ = data
    index = build_index(keys[:100], "Flat")
    with pytest.raises(ValueError, match="unknown search backend 'cuda'"):
        SearchIndex(index, SearchOptions(backend="cuda"))
    if not hasattr(faiss, "StandardGpuResources"):
        with pytest.raises(ValueError, match="use 'torch-ivf' or 'torch'"):
            SearchIndex(index, SearchOptions(backend="faiss-gpu"))
    with pytest.raises(ValueError, match="invalid FAISS factory string 'IVF,Nope'"):
        build_index(keys[:100], "IVF,Nope")
    with pytest.raises(ValueError, match=r"queries must be \[B, 64\]"):
        SearchIndex(index).search(torch.zeros(1, 8), 5)


def test_load_truncated_index_names_the_file(data, tmp_path):
    keys, _ = data
    path = tmp_path / "index.faiss"
    faiss.write_index(build_index(keys[:1000], "Flat"), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="index.faiss: not a readable FAISS index"):
        SearchIndex.load(path)


def test_evaluation_metrics(data):
    keys, queries = data
    flat = build_index(keys, "Flat")
    assert recall_at_k(flat, keys, queries, 20) == 1.0
    assert recall_at_k(SearchIndex(flat, SearchOptions(backend="torch")), flat, queries, 20) == 1.0
    assert self_retrieval_mrr(flat, keys, k=10, sample_size=200) == pytest.approx(1.0)
    ivf = build_index(keys, "IVF32,Flat")
    assert recall_at_k(SearchIndex(ivf, SearchOptions(nprobe=1)), keys, queries, 50) < 0.9
    assert recall_at_k(SearchIndex(ivf, SearchOptions(nprobe=32)), keys, queries, 50) == 1.0  # every list: exact


def test_auto_backend_is_torch_on_a_gpu(data):
    keys, _ = data
    flat, ivf = build_index(keys[:1000], "Flat"), build_index(keys, "IVF32,PQ16")
    cuda = torch.device("cuda")  # a choice made from the device type alone: no GPU needed to check it
    assert auto_backend(flat, cuda) == "torch" and auto_backend(ivf, cuda) == "torch-ivf"
    assert auto_backend(flat, torch.device("cpu")) == auto_backend(ivf, torch.device("cpu")) == "faiss"
    assert SearchIndex(ivf).backend == "faiss"
    with pytest.raises(ValueError, match="'torch-ivf' needs an IVF index, not IndexFlat"):
        SearchIndex(flat, SearchOptions(backend="torch-ivf"))


@pytest.mark.parametrize("factory", ["IVF32,SQfp16", "IVF32,Flat", "IVF32,PQ16", "IVF32,PQ32x4", "OPQ16_64,IVF32,PQ16"])
def test_torch_ivf_returns_what_faiss_returns(data, factory):
    """The GPU path's search (centroids, lists, PQ lookup tables in torch), run here on the CPU."""
    keys, queries = data
    index = build_index(keys, factory)
    expected = SearchIndex(index, SearchOptions(backend="faiss", nprobe=4)).search(torch.from_numpy(queries), 50)
    search = SearchIndex(index, SearchOptions(backend="torch-ivf", nprobe=4))
    assert search.backend == "torch-ivf" and search.nprobe == 4 and search.index is None
    scores, ids = search.search(torch.from_numpy(queries), 50)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected[0], atol=1e-5)
    assert (ids == expected[1]).mean() > 0.99  # equal up to the order of float ties
    assert recall_at_k(search, keys, queries, 50) >= 0.85
    one = search.search(torch.from_numpy(queries[:1]), 50)  # batch 1, as a decode step of one request
    np.testing.assert_array_equal(one[1], ids[:1])


def test_torch_ivf_with_fewer_keys_in_the_probed_lists_than_k(data):
    keys, queries = data
    scores, ids = SearchIndex(build_index(keys, "IVF256,SQfp16"), SearchOptions(backend="torch-ivf", nprobe=1)).search(
        torch.from_numpy(queries[:4]), 500
    )
    found = ids >= 0
    assert found[:, 0].all() and not found[:, -1].any()
    assert np.array_equal(np.isfinite(scores), found)
    assert all(np.all(found[i, : found[i].sum()]) for i in range(4))  # found ids first, then -1


def test_torch_ivf_holds_pq_codes_not_keys(data):
    keys, _ = data
    search = SearchIndex(build_index(keys, "IVF32,PQ16"), SearchOptions(backend="torch-ivf"))
    # 16 bytes of codes and a 4-byte id a key; per list a centroid, a start and a size; the codebooks.
    assert search.memory_bytes() == 20 * len(keys) + 32 * (64 * 4 + 2 * 8) + 16 * 256 * 4 * 4


@pytest.mark.parametrize("factory", ["Flat", "IVF32,SQfp16", "IVF32,PQ16", "OPQ16_64,IVF32,PQ16"])
def test_shards_encoded_apart_and_merged_equal_one_build(data, factory):
    """What the distributed build does: train once, encode shards anywhere, merge in order."""
    keys, queries = data
    whole = build_index(keys, factory)
    trained = new_index(keys.shape[1], factory)
    rows = train_rows(len(keys), trained)
    if len(rows):
        train_index(trained, keys[rows])
    merged = empty_copy(trained)
    bounds = [0, 1000, 1001, 5000, len(keys)]
    shards = [encode_shard(trained, keys[a:b], a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for shard in shards:  # in key order, as the build merges them
        merge_shard(merged, shard)
    set_search_defaults(merged)
    assert mergeable(merged)
    assert np.array_equal(faiss.serialize_index(merged), faiss.serialize_index(whole))


def test_hnsw_is_not_mergeable(data):
    keys, _ = data
    assert not mergeable(build_index(keys[:300], "HNSW16"))


@pytest.mark.parametrize(
    "factory, backend", [("IVF32,SQfp16", "torch-ivf"), ("IVF32,PQ16", "torch-ivf"), ("Flat", "torch")]
)
def test_a_small_workspace_searches_in_chunks_with_the_same_results(data, factory, backend):
    """The transient-memory ceiling: queries (and, for exact search, keys) are searched in chunks."""
    keys, queries = data
    index = build_index(keys, factory)
    whole = SearchIndex(index, SearchOptions(backend=backend, nprobe=4 if backend == "torch-ivf" else None))
    tiny = SearchIndex(index, SearchOptions(backend=backend, nprobe=whole.nprobe, workspace_bytes=64 << 10))
    assert tiny._backend._rows < len(queries) <= whole._backend._rows
    if backend == "torch":
        assert tiny._backend._block < len(keys)  # 64 kB hold fewer key scores than one query has
    expected, got = whole.search(torch.from_numpy(queries), 50), tiny.search(torch.from_numpy(queries), 50)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    assert (got[1] == expected[1]).mean() > 0.99  # equal up to the order of float ties


@pytest.mark.parametrize("factory", ["IVF32,Flat", "OPQ16_64,IVF32,PQ16"])
def test_coarse_map_assigns_keys_to_the_index_own_lists(data, factory):
    """What the online store files its keys under: the datastore's IVF lists, pre-transforms folded in."""
    keys, queries = data
    index = build_index(keys, factory)
    q = torch.from_numpy(queries).float()
    ivf = faiss.extract_index_ivf(index)
    x = queries.astype(np.float32)
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        x = faiss.downcast_index(index).chain.at(0).apply(x)
    _, expected = ivf.quantizer.search(np.ascontiguousarray(x), 1)
    for backend in ("faiss", "torch-ivf"):
        weight, bias = SearchIndex(index, SearchOptions(backend=backend)).coarse_map(nlist=999)
        assert weight.shape == (D, 32)
        assert ((q @ weight + bias).argmax(dim=1).numpy() == expected[:, 0]).mean() > 0.99


def test_coarse_map_of_an_index_without_lists_trains_its_own(data):
    keys, _ = data
    weight, bias = SearchIndex(build_index(keys, "Flat")).coarse_map(nlist=64)
    assert weight.shape == (D, 64) and bias.abs().sum() == 0
    torch.testing.assert_close(weight.norm(dim=0), torch.ones(64))  # unit centroids
    lists = (torch.from_numpy(keys).float() @ weight).argmax(dim=1)
    assert len(lists.unique()) > 48  # the keys spread over the lists
