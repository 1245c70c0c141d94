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


def test_ray_datastore_equals_single_process_datastore(tiny_model, build_corpus, ray_cluster, tmp_path):
    """IVF-PQ (trained once on a sample, shards encoded by 2 Ray workers and merged): byte for byte one process's
    datastore, and the same neighbours for every query."""
    extra = ("--index", "IVF8,PQ8")
    with in_process_vllm():  # the workers inherit the driver's VLLM_* settings
        one = run_datastore(parse_args(build_args(tiny_model, build_corpus, tmp_path / "one", *extra)))
        summary = run_datastore(
            parse_args(build_args(tiny_model, build_corpus, tmp_path / "ray", *extra, "--ray", "--ray-workers", "2"))
        )
    assert summary["keys"] == one["keys"]
    for name in ("index.faiss", "tokens.npy", "offsets.npy", "projection.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    single, ray_built = Datastore.load(tmp_path / "one"), Datastore.load(tmp_path / "ray")
    assert ray_built.manifest.build["ray"] is True and ray_built.manifest.index_factory == "IVF8,PQ8"

    keys = single.index.index.reconstruct_n(0, single.index.ntotal)
    rng = np.random.default_rng(0)
    random = rng.standard_normal((32, keys.shape[1])).astype(np.float32)
    queries = torch.from_numpy(np.concatenate([keys[rng.choice(len(keys), 32)], random]))
    expected, got = single.index.search(queries, 10), ray_built.index.search(queries, 10)
    assert np.array_equal(expected[1], got[1]) and np.array_equal(expected[0], got[0])


def test_ray_generate_equals_the_single_process_resumed_file(
    tiny_model, build_corpus, generated, ray_cluster, tmp_path
):
    out = tmp_path / "ray.jsonl"
    with in_process_vllm():
        run_generate(parse_args(gen_args(tiny_model, build_corpus, out, "--limit", "10", "--shard-size", "3", "--ray")))
    assert read_rows(out) == read_rows(generated[0])
