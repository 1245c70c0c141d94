"""`dresd-bench retrieval` (or `python -m benchmarks.retrieval`): the retrieval path alone, no LLM.

For each datastore size it builds a datastore of synthetic LLM-like hidden states, then measures
one `Retriever.draft` call (projection + search + first-token filter + merge) at several batch
sizes: p50/p99 latency, recall@K of the index against exact search on held-out states, the
self-retrieval MRR, and bytes per key on disk and in memory. JSON out and a printed table.
Runs on the CPU, or on a GPU with `--device cuda` (FAISS GPU when installed, else the torch backend).

Synthetic states: sequences walk a Markov chain over clusters; a state is its cluster's centre
plus a low-rank (latent) offset plus a little isotropic noise, like LLM states whose intrinsic
dimension is far below the hidden size. The token a state "produces" is its cluster's token
(mostly), so the first-token filter and the merge do real work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from build_tools.cli import comma_list
from dresd_vllm.datastore import Datastore, Manifest, token_store_from_sequences, write_datastore
from dresd_vllm.evaluation import recall_at_k, self_retrieval_mrr
from dresd_vllm.index import BACKENDS, add_keys, auto_factory, new_index, set_search_defaults, train_index, train_rows
from dresd_vllm.projection import Projection
from dresd_vllm.retriever import MERGES, Retriever

from .report import fmt, machine, table

_GEN_CHUNK = 32_768


class SyntheticCorpus:
    """A generator of token sequences and the hidden states that go with them (see the module doc).

    A state is built in a ``latent_dim``-dimensional space (cluster centre + an offset in
    ``local_dim`` directions of its own, the local intrinsic dimension), embedded into
    ``hidden_size`` dimensions with isotropic noise, then given LLM-like per-feature scales and
    offsets (a few huge "outlier" features), which the z-score must undo.
    """

    def __init__(
        self,
        hidden_size: int,
        num_clusters: int = 1024,
        latent_dim: int = 64,
        local_dim: int = 16,
        spread: float = 2.0,
        vocab_size: int = 32_000,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_clusters = num_clusters
        self.centres = rng.standard_normal((num_clusters, latent_dim)).astype(np.float32)
        local = np.argsort(rng.random((num_clusters, latent_dim)), axis=1)[:, :local_dim]
        self.local_scale = np.zeros((num_clusters, latent_dim), dtype=np.float32)
        np.put_along_axis(self.local_scale, local, spread, axis=1)
        self.local_basis = (rng.standard_normal((latent_dim, latent_dim)) / np.sqrt(latent_dim)).astype(np.float32)
        self.embed = rng.standard_normal((latent_dim, hidden_size)).astype(np.float32)
        self.feature_scale = np.exp(rng.standard_normal(hidden_size)).astype(np.float32)
        self.feature_offset = (3 * rng.standard_normal(hidden_size)).astype(np.float32)
        self.successor = rng.integers(0, num_clusters, size=num_clusters)  # the chain's likely next cluster
        self.cluster_token = rng.integers(0, vocab_size, size=num_clusters)

    def sample(self, n: int, rng: np.random.Generator, seq_len: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """``n`` positions in sequences of ``seq_len``: (clusters int64 [n], tokens int32 [n]).

        ``tokens[i]`` is the token that position i's state produced.
        """
        clusters = np.empty(n, dtype=np.int64)
        jump = rng.random(n) < 0.3
        random_cluster = rng.integers(0, self.num_clusters, size=n)
        for i in range(n):  # a Markov chain is sequential: about 1 s per million positions
            starts = i % seq_len == 0 or jump[i]
            clusters[i] = random_cluster[i] if starts else self.successor[clusters[i - 1]]
        noisy = rng.random(n) < 0.1
        tokens = np.where(noisy, rng.integers(0, self.vocab_size, size=n), self.cluster_token[clusters])
        return clusters, tokens.astype(np.int32)

    def states(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Hidden states float32 ``[len(clusters), hidden_size]`` for the given clusters."""
        z = rng.standard_normal(self.local_scale[clusters].shape, dtype=np.float32) * self.local_scale[clusters]
        latent = self.centres[clusters] + z @ self.local_basis
        noise = rng.standard_normal((len(clusters), self.hidden_size), dtype=np.float32)
        return (latent @ self.embed + noise) * self.feature_scale + self.feature_offset


def synthetic_datastore(
    path: Path,
    num_keys: int,
    hidden_size: int,
    pca_dim: int,
    factory: str,
    n_next: int = 20,
    seed: int = 0,
    seq_len: int = 512,
    **corpus_options: Any,
) -> tuple[SyntheticCorpus, np.ndarray, dict[str, float]]:
    """Write a synthetic datastore at ``path``; returns the corpus, the keys and build timings per stage."""
    # About 1000 keys per cluster at every size, so neighbourhoods look alike from 1e3 to 1e6 keys.
    corpus = SyntheticCorpus(hidden_size, num_clusters=max(8, num_keys // 1000), seed=seed, **corpus_options)
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    clusters, produced = corpus.sample(num_keys, rng, seq_len)
    fit_rows = min(num_keys, 20_000)
    projection = Projection.fit(corpus.states(clusters[:fit_rows], rng), dim=pca_dim, seed=seed)
    keys = np.empty((num_keys, pca_dim), dtype=np.float16)
    for start in range(0, num_keys, _GEN_CHUNK):
        part = clusters[start : start + _GEN_CHUNK]
        keys[start : start + len(part)] = projection.transform(corpus.states(part, rng))
    # Position p of a sequence holds the token that position p - 1 produced (the first is a BOS-like 0),
    # so key i's value[0] = produced[i], the token its state produced.
    sequences = [
        np.concatenate(([0], produced[s : s + seq_len - 1]))[: min(seq_len, num_keys - s)]
        for s in range(0, num_keys, seq_len)
    ]
    tokens, offsets = token_store_from_sequences(sequences, n_next, eos_id=1)
    generate_s = time.perf_counter() - t0
    factory = auto_factory(num_keys) if factory == "auto" else factory
    t0 = time.perf_counter()
    index = new_index(pca_dim, factory)
    rows = train_rows(num_keys, index, seed)
    if len(rows):
        train_index(index, keys[rows], seed)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    add_keys(index, keys, 0)
    set_search_defaults(index)
    add_s = time.perf_counter() - t0
    manifest = Manifest(
        model="synthetic",
        hidden_size=hidden_size,
        vocab_size=corpus.vocab_size,
        tokenizer_fingerprint=None,
        template="{prompt}",
        n_next=n_next,
        pca_dim=pca_dim,
        num_keys=num_keys,
        index_factory=factory,
        build={"seed": seed, "generator": "benchmarks.retrieval.SyntheticCorpus"},
    )
    t0 = time.perf_counter()
    write_datastore(path, manifest, projection, index, tokens, offsets)
    stages = {"generate_s": generate_s, "train_s": train_s, "add_s": add_s, "write_s": time.perf_counter() - t0}
    return corpus, keys, stages


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1e3 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def measure_latency(
    retriever: Retriever,
    hidden: torch.Tensor,
    last_tokens: np.ndarray,
    batch_size: int,
    iters: int,
    warmup: int,
    max_len: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """p50/p99/mean of one ``draft`` call on random batches of the held-out states, and its stages."""
    stages = ("projection", "search", "merge")
    times: dict[str, list[float]] = {name: [] for name in ("total", *stages)}
    stats = retriever.stats
    for i in range(warmup + iters):
        rows = rng.choice(hidden.shape[0], size=batch_size, replace=False)
        batch, last = hidden[torch.from_numpy(rows).to(hidden.device)], last_tokens[rows]
        if i == warmup:
            stats.reset()
        before = stats.snapshot()
        t0 = time.perf_counter()
        retriever.draft(batch, last, max_len)
        total = time.perf_counter() - t0
        if i >= warmup:
            times["total"].append(total)
            for name in stages:
                times[name].append(getattr(stats, f"{name}_s") - getattr(before, f"{name}_s"))
    requests = max(stats.requests, 1)
    return {
        **_percentiles(times["total"]),
        **{f"{name}_ms": 1e3 * float(np.median(times[name])) for name in stages},  # medians, like p50
        "survivors_per_request": stats.survivors / requests,
        "draft_tokens_per_request": stats.draft_tokens / requests,
    }


def bench_one(args: argparse.Namespace, num_keys: int, work: Path) -> list[dict[str, Any]]:
    """Build one datastore of ``num_keys`` and measure it at every nprobe and batch size."""
    path = work / f"datastore-{num_keys}"
    print(f"== {num_keys} keys: generating and building {args.factory} ...", flush=True)
    corpus, keys, build_s = synthetic_datastore(
        path,
        num_keys,
        args.hidden_size,
        args.pca_dim,
        args.factory,
        seed=args.seed,
        local_dim=args.local_dim,
        spread=args.spread,
    )
    disk = {f.name: f.stat().st_size for f in path.iterdir()}
    rng = np.random.default_rng(args.seed + 2)
    clusters, produced = corpus.sample(args.queries, rng)
    device = torch.device(args.device)
    hidden = torch.from_numpy(corpus.states(clusters, rng)).to(device)

    results = []
    peak_build_mb = _peak_rss_mb()
    for nprobe in args.nprobe or [None]:
        t0 = time.perf_counter()
        ds = Datastore.load(path, backend=args.backend, device=device, nprobe=nprobe)
        load_s = time.perf_counter() - t0
        recall = recall_at_k(ds.index, keys, ds.projection(hidden), args.top_k)
        retriever = Retriever(ds, top_k=args.top_k, merge=args.merge, min_support=args.min_support)
        latency = {
            str(b): measure_latency(retriever, hidden, produced, b, args.iters, args.warmup, args.max_len, rng)
            for b in args.batch_sizes
        }
        memory = ds.index.memory_bytes()
        results.append(
            {
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
                "build_s": {**build_s, **ds.manifest.build},
                "load_s": load_s,
                "peak_rss_mb_build": peak_build_mb,
                "load_average": os.getloadavg(),
                "latency": latency,
            }
        )
        _print_rows(results[-1:], args.top_k)
    return results


HEADERS = [
    "keys",
    "index",
    "nprobe",
    "backend",
    "batch",
    "p50 ms",
    "p99 ms",
    "proj/search/merge ms",
    "recall",
    "B/key mem",
    "B/key disk",
]


def _print_rows(results: list[dict[str, Any]], top_k: int) -> None:
    rows = []
    for r in results:
        for batch, lat in r["latency"].items():
            stages = "/".join(fmt(lat[f"{s}_ms"], ".3f") for s in ("projection", "search", "merge"))
            rows.append(
                [
                    str(r["num_keys"]),
                    r["index_factory"],
                    fmt(r["nprobe"], "d"),
                    r["backend"],
                    batch,
                    fmt(lat["p50_ms"], ".3f"),
                    fmt(lat["p99_ms"], ".3f"),
                    stages,
                    fmt(r[f"recall@{top_k}"], ".3f"),
                    fmt(r["bytes_per_key_server"], ".0f"),
                    fmt(r["bytes_per_key_disk"], ".0f"),
                ]
            )
    print(table(HEADERS, rows), flush=True)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `retrieval` subcommand on ``subparsers``."""
    p = subparsers.add_parser("retrieval", help="latency, recall and size of the retrieval path alone (no LLM)")
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
        "--batch-sizes", type=comma_list(int), default=[1, 8, 64], help="requests per retriever call (default: 1,8,64)"
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
    p.add_argument("--iters", type=int, default=300, help="timed calls per batch size")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="where the datastores go (default: a temporary directory, removed)")
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
        with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
            for num_keys in args.num_keys:
                results.extend(bench_one(args, num_keys, Path(work)))
    finally:
        faiss.omp_set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    report = {
        "command": " ".join(sys.argv),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__},
        "python": platform.python_version(),
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "threads": used,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\nall results:")
    _print_rows(results, args.top_k)
    print(f"report: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
