"""Build throughput: tokens embedded per second by `dresd-build datastore`, one in-process vLLM engine
vs N Ray workers (a local Ray cluster of N CPUs, or GPUs where there are any) on this machine.

    python -m benchmarks.build_throughput [--model M] [--dataset D] [--limit 1000] [--workers 2] [--json OUT]

Both runs embed the same corpus, cut into the same shards, with the build's own `EmbedWorker` (vLLM
pooling runner + projection) and the build's own Ray Data job. Reported per run:

    end-to-end  tokens / wall time, engine start-up included (what a user waits for)
    steady      the sum over workers of tokens / engine time: the rate once every engine is up

Without --model the embedded default target is used, or, before it is trained, a random Llama of the
same shape (throughput does not depend on the weights). On a shared machine the figures move with
its load, which the report records.
"""

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from build_tools.build import _tasks
from build_tools.data import Template, encode_corpus, load_rows
from build_tools.embed import EmbedWorker, load_tokenizer, model_info, unbatch
from build_tools.ray_jobs import run
from dresd_vllm.assets import DEFAULT_DATASET, TINY_MODEL
from dresd_vllm.projection import Projection


def default_shaped_model(tmp: Path) -> str:
    """The embedded target's architecture (hidden 256, 4 layers, head_dim 64) with random weights."""
    from build_tools.tiny_model import make_llama, save_checkpoint, train_tokenizer

    rows = DEFAULT_DATASET.rows("train")[:2000]
    tokenizer = train_tokenizer([r["instruction"] + "\n" + r["response"] for r in rows], vocab_size=4096)
    model = make_llama(tokenizer, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688)
    return str(save_checkpoint(model, tokenizer, tmp / "default-shaped"))


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
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (TINY_MODEL if Path(TINY_MODEL).is_dir() else default_shaped_model(Path(tmp)))
        tokenizer = load_tokenizer(model)
        rows = load_rows(args.dataset, limit=args.limit)
        corpus = encode_corpus(rows, Template("chat", tokenizer), args.prompt_key, args.response_key, args.max_length)
        tasks = _tasks(corpus, np.arange(len(corpus.lengths)), args.shard_tokens)
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
        model=model if args.model else f"{model} (shape of the embedded default)",
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
