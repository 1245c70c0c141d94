"""The index stage's worker: encodes a shard like the one-process build, on every CPU it is given."""

import os

import faiss
import numpy as np

from build_tools.index_shards import IndexWorker, index_task
from dresd_vllm.index.build import new_index, train_index


def test_worker_unpins_the_thread_that_encodes(tmp_path):
    keys = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float16)
    path = tmp_path / "00000.npy"
    np.save(path, keys)
    index = new_index(16, "IVF4,PQ4")
    train_index(index, keys.astype(np.float32))
    worker = IndexWorker(faiss.serialize_index(index).tobytes(), threads=1)
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # as Ray Data's workers were found under a preloaded Intel OpenMP
    try:
        out = worker({k: [v] for k, v in index_task(0, str(path), 0).items()})
        assert os.sched_getaffinity(0) == everything
    finally:
        os.sched_setaffinity(0, everything)
    shard = faiss.deserialize_index(np.frombuffer(out["data"][0], dtype=np.uint8))
    assert shard.ntotal == len(keys) and out["positions"] == [len(keys)]
