"""The index stage of `dresd-build datastore`: encode shards of keys into a trained index, anywhere.

The driver trains the index once on a sample of the keys. `IndexWorker` encodes one shard of keys
(a `.npy` file the embed stage wrote) into a copy of the trained index and returns it serialised;
the driver merges the shards in key order. In-process and on Ray the same class does the same work
per shard, so both builds write the same index file, byte for byte; no process ever holds every
key at full precision, only the merged index's codes. On Ray the workers read the shard files, so
the work directory must be on a filesystem they share (always so on a local cluster).
"""

import os
import socket
import time
from typing import Any

import faiss
import numpy as np

from build_tools.embed import unbatch
from dresd_vllm.index.build import encode_shard
from dresd_vllm.index.threads import omp_threads


def index_task(shard: int, path: str, first_id: int) -> dict[str, Any]:
    """One unit of work: a shard file of keys and the id of its first key."""
    return {"shard": shard, "path": path, "first_id": first_id}


class IndexWorker:
    """Encodes shards into copies of a trained, empty index; a callable class, as Ray Data wants.

    ``threads`` FAISS threads (None: FAISS's default, every core). On Ray each worker holds one CPU,
    so it runs one thread and the workers, not the threads, use the cores.
    """

    def __init__(self, trained: bytes, threads: int | None = None):
        self.trained = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        self.threads = threads

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Map a batch of index tasks to `{"shard", "positions", "data", "seconds", "worker"}`.

        `data` is the serialised index holding the shard's keys under their global ids.
        """
        out: dict[str, list] = {"shard": [], "positions": [], "data": [], "seconds": [], "worker": []}
        for task in unbatch(batch):
            start = time.perf_counter()
            keys = np.load(task["path"], mmap_mode="r")
            _unpin()
            # OpenMP's thread count is per calling thread, and Ray may call from another than __init__'s.
            with omp_threads(self.threads):
                shard = encode_shard(self.trained, keys, int(task["first_id"]))
            out["shard"].append(int(task["shard"]))
            out["positions"].append(len(keys))
            out["data"].append(faiss.serialize_index(shard).tobytes())
            out["seconds"].append(time.perf_counter() - start)
            out["worker"].append(f"{socket.gethostname()}:{os.getpid()}")
        return out

    def close(self) -> None:
        """Nothing to release (the same interface as `EmbedWorker`)."""


def _unpin() -> None:
    """Let the calling thread run on every CPU of the machine again.

    Under a preloaded Intel OpenMP, Ray Data's workers were found pinned to CPU 0 (measured: two
    workers on a 2-core machine each ran at half speed, 1.04x one process); the kernel still
    confines the thread to its cgroup's CPUs.
    """
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # CPUs outside this container's set: keep what the kernel gave
        pass

