"""dresd-build on a local 2-worker Ray cluster equals the single-process build, byte for byte."""

import numpy as np
import pytest
import torch
from conftest import build_args, gen_args, in_process_vllm, read_rows

from build_tools.build import run_datastore
from build_tools.cli import parse_args
from build_tools.generate import run_generate
from dresd_vllm.store.datastore import Datastore


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on this machine, stopped after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_datastore_equals_single_process_datastore(tiny_model, build_corpus, single_build, ray_cluster, tmp_path):
    out = tmp_path / "ray-ds"
    with in_process_vllm():  # the workers inherit the driver's VLLM_* settings
        summary = run_datastore(parse_args(build_args(tiny_model, build_corpus, out, "--ray", "--ray-workers", "2")))
    assert summary["keys"] == single_build[1]["keys"]
    single, ray_built = Datastore.load(single_build[0]), Datastore.load(out)
    assert ray_built.manifest.build["ray"] is True

    assert np.array_equal(single.tokens, ray_built.tokens) and np.array_equal(single.offsets, ray_built.offsets)
    keys = single.index.index.reconstruct_n(0, single.index.ntotal)
    assert np.array_equal(keys, ray_built.index.index.reconstruct_n(0, ray_built.index.ntotal))
    assert torch.equal(single.projection.weight, ray_built.projection.weight)
    assert (single_build[0] / "index.faiss").read_bytes() == (out / "index.faiss").read_bytes()

    rng = np.random.default_rng(0)
    random = rng.standard_normal((32, keys.shape[1])).astype(np.float32)
    queries = torch.from_numpy(np.concatenate([keys[rng.choice(len(keys), 32)], random]))
    expected, got = single.index.search(queries, 10), ray_built.index.search(queries, 10)
    assert np.array_equal(expected[1], got[1]) and np.array_equal(expected[0], got[0])


def test_ray_index_stage_equals_the_single_process_one(tiny_model, build_corpus, ray_cluster, tmp_path):
    """IVF-PQ: trained once on a sample, shards encoded by 2 Ray workers and merged = one process's index."""
    extra = ("--index", "IVF8,PQ8")
    with in_process_vllm():
        run_datastore(parse_args(build_args(tiny_model, build_corpus, tmp_path / "one", *extra)))
        run_datastore(
            parse_args(build_args(tiny_model, build_corpus, tmp_path / "ray", *extra, "--ray", "--ray-workers", "2"))
        )
    for name in ("index.faiss", "tokens.npy", "offsets.npy", "projection.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert Datastore.load(tmp_path / "ray").manifest.index_factory == "IVF8,PQ8"


def test_ray_generate_equals_the_single_process_resumed_file(
    tiny_model, build_corpus, generated, ray_cluster, tmp_path
):
    out = tmp_path / "ray.jsonl"
    with in_process_vllm():
        run_generate(parse_args(gen_args(tiny_model, build_corpus, out, "--limit", "10", "--shard-size", "3", "--ray")))
    assert read_rows(out) == read_rows(generated[0])
