"""`dresd-bench retrieval` (or `python -m benchmarks.retrieval`): the served drafting step alone, no LLM.

For each datastore size it builds a datastore of synthetic LLM-like hidden states, then times the
served path, :meth:`Drafter.step` (projection, static search, online search, the copy back, merge,
context, scoring and cut), at several batch sizes: p50/p99 of the step and of each stage, recall@K
of the index against exact search on held-out states, the self-retrieval MRR, and bytes per key on
disk and in memory. ``--online-keys N`` first fills the online store with N keys drawn like the
datastore's. JSON out and a printed table. Runs on the CPU, or on a GPU with `--device cuda`.
The synthetic states are `benchmarks.synthetic`'s. With `--work-dir` the datastores are kept there and
a later run with the same build settings only loads and measures them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from build_tools.cli import comma_list
from build_tools.index_metrics import recall_at_k, self_retrieval_mrr
from dresd_vllm.config import DresdConfig
from dresd_vllm.index.search import BACKENDS, SearchOptions
from dresd_vllm.spec.drafting import Drafter
from dresd_vllm.spec.retriever import MERGES
from dresd_vllm.store.datastore import Datastore

from .report import finish, fmt, markdown_table, table
from .synthetic import SyntheticCorpus, SyntheticSettings, open_or_build, peak_rss_mb

# Stages of a step: the retriever's, then the drafter's.
RETRIEVER_STAGES = ("projection", "search", "online_search", "copy", "merge")
DRAFTER_STAGES = ("context", "score")
STAGES = RETRIEVER_STAGES + DRAFTER_STAGES
# Tokens of each request's history before the first timed step (what the context source searches).
_HISTORY = 64


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1e3 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def fill_online(drafter: Drafter, corpus: SyntheticCorpus, num_keys: int, rng: np.random.Generator) -> None:
    """Fill the drafter's online store with ``num_keys`` keys drawn like the datastore's, with stored values."""
    online, ds = drafter.online, drafter.datastore
    if online is None or num_keys == 0:
        return
    for start in range(0, num_keys, 65_536):
        clusters, _ = corpus.sample(min(65_536, num_keys - start), rng)
        keys = ds.projection(torch.from_numpy(corpus.states(clusters, rng)).to(ds.index.device))
        values = ds.continuations(rng.integers(0, ds.manifest.num_keys, size=len(clusters)))
        online.add_complete(keys, values)


def measure_steps(
    drafters: list[Drafter],
    hidden: torch.Tensor,
    produced: np.ndarray,
    batch_size: int,
    iters: int,
    warmup: int,
    max_len: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """p50/p99/mean of ``Drafter.step`` for one batch of decoding requests (wall and CPU time), and of its stages.

    Each step the requests sample one token (a held-out state's own next token) and verify it: one
    verified state per request, whose key the online store then adds. Several ``drafters`` take the
    same steps interleaved (in turn, the order reversed every other step), so that a load that comes
    and goes on the machine weighs on each alike.
    """
    steps = warmup + iters
    req_ids = [f"req-{batch_size}-{i}" for i in range(batch_size)]
    vocab = drafters[0].datastore.manifest.vocab_size
    token_ids = rng.integers(2, vocab, size=(batch_size, _HISTORY + steps + 1))
    num_tokens = np.full(batch_size, _HISTORY)
    caps = np.full(batch_size, max_len)
    times: list[dict[str, list[float]]] = [{name: [] for name in ("total", "cpu", *STAGES)} for _ in drafters]
    survivors, drafted = [0] * len(drafters), [0] * len(drafters)
    for i in range(steps):
        rows = rng.choice(hidden.shape[0], size=batch_size, replace=False)
        token_ids[:, num_tokens[0]] = produced[rows]
        num_tokens += 1
        sampled = [[int(t)] for t in produced[rows]]
        verified = hidden[torch.from_numpy(rows).to(hidden.device)]
        for d in range(len(drafters)) if i % 2 == 0 else reversed(range(len(drafters))):
            drafter = drafters[d]
            before = drafter.retriever.stats.snapshot(), _drafter_seconds(drafter.stats)
            t0, c0 = time.perf_counter(), time.thread_time()
            drafts = drafter.step(req_ids, sampled, num_tokens, token_ids, verified, caps)
            total, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if i < warmup:
                continue
            times[d]["total"].append(total)
            times[d]["cpu"].append(cpu)
            for name in RETRIEVER_STAGES:
                times[d][name].append(getattr(drafter.retriever.stats, f"{name}_s") - getattr(before[0], f"{name}_s"))
            for name in DRAFTER_STAGES:
                times[d][name].append(getattr(drafter.stats, f"{name}_s") - before[1][f"{name}_s"])
            survivors[d] += drafter.retriever.stats.survivors - before[0].survivors
            drafted[d] += sum(map(len, drafts))
    requests = batch_size * iters
    return [
        {
            **_percentiles(times[d]["total"]),
            # The calling thread's CPU time (every search runs in it, one thread): on a shared machine a step
            # that waits for a core takes longer on the clock, not in CPU time.
            **{f"cpu_{k}": v for k, v in _percentiles(times[d]["cpu"]).items()},
            "stages": {name: _percentiles(times[d][name]) for name in STAGES},
            **{f"{name}_ms": 1e3 * float(np.median(times[d][name])) for name in STAGES},  # medians, like p50
            "survivors_per_request": survivors[d] / requests,
            "draft_tokens_per_request": drafted[d] / requests,
            "online_keys_after": len(drafter.online) if drafter.online is not None else 0,
        }
        for d, drafter in enumerate(drafters)
    ]


def _drafter_seconds(stats: Any) -> dict[str, float]:
    """The drafter's stage seconds now (its stats object keeps counting)."""
    return {f"{name}_s": getattr(stats, f"{name}_s") for name in DRAFTER_STAGES}


def online_keys_list(text: str) -> list[int | None]:
    """``--online-keys``: key counts, or ``off`` for a drafter without an online store."""
    return [None if part == "off" else int(part) for part in text.split(",")]


def bench_one(args: argparse.Namespace, num_keys: int, work: Path) -> list[dict[str, Any]]:
    """Build (or, in a kept work directory, reuse) one datastore of ``num_keys``; measure every nprobe and batch."""
    settings = SyntheticSettings(
        num_keys=num_keys,
        hidden_size=args.hidden_size,
        pca_dim=args.pca_dim,
        factory=args.factory,
        seed=args.seed,
        local_dim=args.local_dim,
        spread=args.spread,
    )
    store = open_or_build(work, settings)
    path, corpus, keys = store.path, store.corpus, store.keys
    disk = {f.name: f.stat().st_size for f in path.iterdir()}
    rng = np.random.default_rng(args.seed + 2)
    clusters, produced = corpus.sample(args.queries, rng)
    device = torch.device(args.device)
    hidden = torch.from_numpy(corpus.states(clusters, rng)).to(device)

    results = []
    for nprobe in args.nprobe or [None]:
        t0 = time.perf_counter()
        ds = Datastore.load(path, SearchOptions(backend=args.backend, device=device, nprobe=nprobe))
        load_s = time.perf_counter() - t0
        recall = recall_at_k(ds.index, keys, ds.projection(hidden), args.top_k)
        memory = ds.index.memory_bytes()
        common = {
            "num_keys": num_keys,
            "index_factory": ds.manifest.index_factory,
            "nprobe": ds.index.nprobe,
            "backend": ds.index.backend,
            "device": str(device),
            f"recall@{args.top_k}": recall,
            "self_mrr": self_retrieval_mrr(ds.index, keys, args.top_k, sample_size=args.queries, seed=args.seed),
            "bytes_per_key_disk": sum(disk.values()) / num_keys,
            "disk_bytes": disk,
            "bytes_per_key_memory": memory / num_keys,
            # What the server holds per key: the searched structure (codes, ids, lists) and the offsets.
            "bytes_per_key_server": (memory + ds.offsets.nbytes) / num_keys,
            "bytes_per_key_token_store": (disk["tokens.npy"] + disk["offsets.npy"]) / num_keys,
            "build_s": {**store.build_s, **ds.manifest.build},
            "reused_build": store.reused,
            "load_s": load_s,
            "peak_rss_mb_build": store.peak_rss_mb_build,
            "load_average_build": store.load_average_build,
        }
        drafters_by_batch = {}
        for b in args.batch_sizes:  # fresh drafters (and stores) per batch size: no state carries over
            drafters_by_batch[b] = []
            for online_keys in args.online_keys:
                config = DresdConfig.from_dict(
                    {
                        "datastore": str(path),
                        "top_k": args.top_k,
                        "merge": args.merge,
                        "min_support": args.min_support,
                        "online_store": online_keys is not None,
                        "online_store_size": args.online_capacity,
                        "token_cost": args.token_cost,
                    }
                )
                drafter = Drafter(ds, config, device=device)
                fill_online(drafter, corpus, online_keys or 0, np.random.default_rng(args.seed + 3))
                drafters_by_batch[b].append(drafter)
        latency = {
            b: measure_steps(drafters, hidden, produced, b, args.iters, args.warmup, args.max_len, rng)
            for b, drafters in drafters_by_batch.items()
        }
        for i, online_keys in enumerate(args.online_keys):
            results.append(
                {
                    **common,
                    "online_store": online_keys is not None,
                    "online_keys": online_keys or 0,
                    "online_capacity": args.online_capacity,
                    "peak_rss_mb": peak_rss_mb(),
                    "load_average": os.getloadavg(),
                    "latency": {str(b): by_drafter[i] for b, by_drafter in latency.items()},
                }
            )
        print(table(HEADERS, _rows(results[-len(args.online_keys) :], args.top_k)), flush=True)
    return results


HEADERS = [
    "keys",
    "index",
    "nprobe",
    "backend",
    "online",
    "batch",
    "p50 ms",
    "p99 ms",
    "proj/search/online/copy/merge/context/score p50 ms",
    "recall",
    "B/key mem",
    "B/key disk",
]


def _rows(results: list[dict[str, Any]], top_k: int) -> list[list[str]]:
    rows = []
    for r in results:
        for batch, lat in r["latency"].items():
            stages = "/".join(fmt(lat[f"{s}_ms"], ".3f") for s in STAGES)
            rows.append(
                [
                    str(r["num_keys"]),
                    r["index_factory"],
                    fmt(r["nprobe"], "d"),
                    r["backend"],
                    str(r["online_keys"]) if r["online_store"] else "off",
                    batch,
                    fmt(lat["p50_ms"], ".3f"),
                    fmt(lat["p99_ms"], ".3f"),
                    stages,
                    fmt(r[f"recall@{top_k}"], ".3f"),
                    fmt(r["bytes_per_key_server"], ".0f"),
                    fmt(r["bytes_per_key_disk"], ".0f"),
                ]
            )
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `retrieval` subcommand on ``subparsers``."""
    p = subparsers.add_parser("retrieval", help="latency of the served drafting step, recall and size (no LLM)")
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-keys",
        type=comma_list(int),
        default=[100_000, 1_000_000],
        help="datastore sizes (default: 100000,1000000)",
    )
    p.add_argument(
        "--batch-sizes", type=comma_list(int), default=[1, 16, 64], help="requests per step (default: 1,16,64)"
    )
    p.add_argument(
        "--online-keys",
        type=online_keys_list,
        default=[0],
        help="keys the online store holds before the first step, or off (no store): one drafter each, their "
        "steps interleaved, e.g. off,0,100000 (default: 0)",
    )
    p.add_argument("--online-capacity", type=int, default=100_000, help="the online store's size (online_store_size)")
    p.add_argument(
        "--token-cost",
        type=float,
        default=0.0,
        help="price of a draft token as a share of a step (token_cost); the default 0 never stands down, so "
        "every stage runs at every batch size",
    )
    p.add_argument("--factory", default="auto", help="FAISS factory string, or auto (default)")
    p.add_argument(
        "--nprobe", type=comma_list(int), help="IVF lists probed, one run each, e.g. 8,16,32 (default: the datastore's)"
    )
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="search backend (default: auto)")
    p.add_argument("--device", default="cpu", help="device of the hidden states and the projection (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS and torch CPU threads while measuring (default: 1, the fastest for small batches on a "
        "busy CPU; 0 keeps their own settings)",
    )
    p.add_argument("--hidden-size", type=int, default=1024, help="synthetic hidden size (default: 1024)")
    p.add_argument("--local-dim", type=int, default=16, help="synthetic states' local intrinsic dimension")
    p.add_argument("--spread", type=float, default=2.0, help="synthetic clusters' size (larger: more overlap)")
    p.add_argument("--pca-dim", type=int, default=64)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--merge", choices=MERGES, default="trie")
    p.add_argument("--min-support", type=float, default=0.2)
    p.add_argument("--max-len", type=int, default=10, help="num_speculative_tokens (default: 10)")
    p.add_argument("--queries", type=int, default=500, help="held-out states for recall and timing")
    p.add_argument("--iters", type=int, default=300, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work-dir",
        help="where the datastores are built and kept; one built there with the same build settings is only "
        "loaded (default: a temporary directory, removed)",
    )
    p.add_argument("--out", default="results/retrieval.json", help="JSON report path")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; writes the JSON report and returns 0."""
    threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    used = {"faiss": faiss.omp_get_max_threads(), "torch": torch.get_num_threads()}
    results = []
    try:
        with tempfile.TemporaryDirectory() if args.work_dir is None else contextlib.nullcontext(args.work_dir) as work:
            for num_keys in args.num_keys:
                results.extend(bench_one(args, num_keys, Path(work)))
    finally:
        faiss.omp_set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    body = {
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "threads": used,
        "results": results,
    }
    rows = _rows(results, args.top_k)
    print("\nall results:")
    print(table(HEADERS, rows))
    out = Path(args.out)
    return finish(out.parent, out.name, body, markdown_table(HEADERS, rows), list, [], table_name=f"{out.stem}.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
