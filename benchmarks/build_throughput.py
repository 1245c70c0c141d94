"""Build throughput: tokens embedded per second by `dresd-build datastore`, one in-process vLLM engine
vs N Ray workers (a local Ray cluster of N CPUs, or GPUs where there are any) on this machine; with
`--stage index`, keys encoded per second by the index stage, one process vs N Ray workers.

    python -m benchmarks.build_throughput [--model M] [--dataset D] [--limit 1000] [--workers 2] [--json OUT]
    python -m benchmarks.build_throughput --stage index [--index-keys 2000000] [--index IVF1024,PQ32]

The index stage runs the build's own code: the index is trained once in the driver, then every
shard of keys is encoded by `IndexWorker` (one FAISS thread each) in this process or on N Ray
workers, and the shards are merged; both merged indexes must be equal byte for byte.

Both runs embed the same corpus, cut into the same shards, with the build's own `EmbedWorker` (vLLM
pooling runner + projection) and the build's own Ray Data job. Reported per run:

    end-to-end  tokens / wall time, engine start-up included (what a user waits for)
    steady      the sum over workers of tokens / engine time: the rate once every engine is up

Without --model the repository's tiny model (`TINY_MODEL`) is used. On a shared machine the figures
move with its load, which the report records.
"""

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import ray

from build_tools.build import embed_tasks
from build_tools.data import Template, encode_corpus, load_rows
from build_tools.embed import EmbedWorker, load_tokenizer, model_info, unbatch
from build_tools.index_shards import IndexWorker, index_task
from build_tools.ray_jobs import run
from dresd_assets import DEFAULT_DATASET, TINY_MODEL
from dresd_vllm.index.build import empty_copy, merge_shard, new_index, train_index, train_rows
from dresd_vllm.store.projection import Projection


def random_projection(hidden_size: int, dim: int = 64, seed: int = 0) -> Projection:
    """A projection of the build's shape; its values do not change the cost of applying it."""
    rng = np.random.default_rng(seed)
    components = np.linalg.qr(rng.standard_normal((hidden_size, dim)))[0].T
    zeros = np.zeros(hidden_size, dtype=np.float32)
    return Projection(zeros, np.ones(hidden_size, dtype=np.float32), components, zeros)


def summarise(name: str, results: list[dict[str, Any]], wall: float, startup: float | None) -> dict[str, Any]:
    tokens = sum(r["positions"] for r in results)
    done: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for r in results:
        done[r["worker"]][0] += r["positions"]
        done[r["worker"]][1] += r["seconds"]
    per_worker = [round(n / secs) for n, secs in done.values()]
    return dict(
        run=name,
        workers_used=len(done),
        tokens=tokens,
        wall_s=round(wall, 2),
        startup_s=None if startup is None else round(startup, 2),
        end_to_end_tok_s=round(tokens / wall),
        per_worker_tok_s=per_worker,
        steady_tok_s=sum(per_worker),
    )


def synthetic_keys(num_keys: int, dim: int = 64, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """Unit fp16 keys around random centres (the cost of encoding does not depend on the values)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    keys = np.empty((num_keys, dim), dtype=np.float16)
    for start in range(0, num_keys, 1 << 18):
        n = min(1 << 18, num_keys - start)
        x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
        keys[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return keys


def _merged(trained: faiss.Index, results: list[dict[str, Any]]) -> bytes:
    index = empty_copy(trained)
    for r in sorted(results, key=lambda r: r["shard"]):
        merge_shard(index, faiss.deserialize_index(np.frombuffer(r["data"], dtype=np.uint8)))
    return faiss.serialize_index(index).tobytes()


def index_stage(args: argparse.Namespace) -> dict[str, Any]:
    """Keys per second of the index stage: one process (one FAISS thread) vs N Ray workers (one each)."""
    load_before = os.getloadavg()
    keys = synthetic_keys(args.index_keys)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = []
        for i, start in enumerate(range(0, len(keys), args.shard_keys)):
            path = Path(tmp) / f"{i:05d}.npy"
            np.save(path, keys[start : start + args.shard_keys])
            tasks.append(index_task(i, str(path), start))
        index = new_index(keys.shape[1], args.index)
        start = time.perf_counter()
        train_index(index, keys[train_rows(len(keys), index)])
        train_s = time.perf_counter() - start
        del keys  # from here on the keys exist only in the shard files, as in a build
        trained = faiss.serialize_index(index).tobytes()

        start = time.perf_counter()
        worker = IndexWorker(trained, threads=1)
        single = [row for task in tasks for row in unbatch(worker({k: [v] for k, v in task.items()}))]
        single_wall = time.perf_counter() - start

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        kwargs = dict(trained=trained, threads=1)
        distributed = list(run(tasks, IndexWorker, kwargs, args.workers, cpu_only=True))
        ray_wall = time.perf_counter() - start
        ray.shutdown()
        start = time.perf_counter()
        merged = _merged(index, single)
        merge_s = time.perf_counter() - start
        if merged != _merged(index, distributed):
            raise RuntimeError("the Ray index stage built a different index than the single process")
    runs = [
        summarise("single process, 1 thread", single, single_wall, None),
        summarise(f"Ray, {args.workers} workers x 1 thread", distributed, ray_wall, None),
    ]
    return dict(
        stage="index",
        index=args.index,
        keys=args.index_keys,
        shards=len(tasks),
        train_s=round(train_s, 2),
        merge_s=round(merge_s, 2),
        speedup_end_to_end=round(single_wall / ray_wall, 2),
        speedup_steady=round(runs[1]["steady_tok_s"] / runs[0]["steady_tok_s"], 2),
        identical=True,
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        cpus=os.cpu_count(),
        runs=runs,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="target model (default: the embedded one, or a random one of its shape)")
    p.add_argument("--dataset", default=DEFAULT_DATASET.train, help="corpus (default: the embedded one)")
    p.add_argument("--prompt-key", default="instruction")
    p.add_argument("--response-key", default="response")
    p.add_argument("--limit", type=int, default=1000, help="rows (default: 1000)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--shard-tokens", type=int, default=16_384, help="tokens per shard (default: 16384)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default: 2)")
    p.add_argument("--engine-args", type=json.loads, default={"dtype": "float32", "enforce_eager": True})
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--stage", choices=("embed", "index"), default="embed", help="stage measured (default: embed)")
    p.add_argument("--index-keys", type=int, default=2_000_000, help="--stage index: keys (default: 2000000)")
    p.add_argument("--index", default="IVF1024,PQ32", help="--stage index: FAISS factory (default: IVF1024,PQ32)")
    p.add_argument("--shard-keys", type=int, default=1 << 17, help="--stage index: keys per shard (default: 131072)")
    args = p.parse_args()
    if args.stage == "index":
        report = index_stage(args)
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return

    model = args.model or TINY_MODEL
    tokenizer = load_tokenizer(model)
    rows = load_rows(args.dataset, limit=args.limit)
    corpus = encode_corpus(rows, Template("chat", tokenizer), args.prompt_key, args.response_key, args.max_length)
    tasks = embed_tasks(corpus, np.arange(len(corpus.lengths)), args.shard_tokens)
    kwargs = dict(
        model=model,
        max_length=args.max_length,
        engine_args=args.engine_args,
        projection=random_projection(model_info(model).hidden_size),
    )
    start = time.perf_counter()
    worker = EmbedWorker(**kwargs)
    startup = time.perf_counter() - start
    single = [row for task in tasks for row in unbatch(worker({k: [v] for k, v in task.items()}))]
    single_wall = time.perf_counter() - start
    worker.close()

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    distributed = list(run(tasks, EmbedWorker, kwargs, args.workers))
    ray_wall = time.perf_counter() - start
    ray.shutdown()

    report = dict(
        model=model,
        sequences=len(corpus.lengths),
        shards=len(tasks),
        load_average=os.getloadavg(),
        cpus=os.cpu_count(),
        vllm_env={k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        runs=[
            summarise("single process", single, single_wall, startup),
            summarise(f"Ray, {args.workers} workers", distributed, ray_wall, None),
        ],
    )
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
