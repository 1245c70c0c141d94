"""The GPU check of the torch search path: TorchIVF, exact search and the online store, one step at a time.

For each synthetic key count it builds an IVF over unit keys (spherical k-means on the device, the
same list and probe counts as a datastore build) and times, at each batch size, one step of each
search as the server runs it: the search, then the one copy back (:class:`HostCopy`). It reports
p50/p99, recall@50 of TorchIVF against exact search, the host waits of a step (on CUDA counted by
``torch.cuda.set_sync_debug_mode("warn")``; everywhere the ops that read device data on the host),
the copies back per step, and the peak transient memory (CUDA) against the workspace ceiling.

It needs a torch and NumPy only: no vLLM, no FAISS, no network (``benchmarks/gpu_check.sh`` runs it on
a GPU machine). ``--device cpu --keys 20000`` is a tiny mode that runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dresd_vllm.index.host_copy import HostCopy
from dresd_vllm.index.torch_ivf import TorchIVF, nprobe_for, spherical_kmeans
from dresd_vllm.index.torch_search import WORKSPACE_BYTES, ExactTorch
from dresd_vllm.online.store import OnlineStore

TOP_K = 50
_CHUNK = 1 << 20  # keys generated or assigned at a time


class HostWaits(TorchDispatchMode):
    """Records the torch ops that make the host wait for the device's data: a value read on the host
    (``item``, ``int``, ``bool``) or a shape that depends on the data (``nonzero``, boolean indexing, ...)."""

    OPS = frozenset(
        {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "equal"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        indices = args[1] if name.startswith("index") and len(args) > 1 else ()
        boolean_index = isinstance(indices, (list, tuple)) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices
        )
        unsized_repeat = name == "repeat_interleave" and kwargs.get("output_size") is None
        if name in self.OPS or boolean_index or unsized_repeat:
            self.ops.append(name)
        return func(*args, **kwargs)


def count_host_waits(step: Any, device: torch.device) -> dict[str, Any]:
    """Run ``step()`` once; the ops that read device data, and (CUDA) the synchronising calls torch flags."""
    syncs = 0
    with warnings.catch_warnings(record=True) as caught, HostWaits() as waits:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchronizing" in str(w.message) for w in caught)
    return {"host_wait_ops": waits.ops, "cuda_syncs": syncs if device.type == "cuda" else None}


def synthetic_keys(n: int, dim: int, device: torch.device, seed: int) -> torch.Tensor:
    """Unit keys like projected LLM states: cluster centres, a low-rank offset and a little noise."""
    centres_gen = torch.Generator().manual_seed(0)  # the same clusters for keys and queries
    centres = torch.randn(4096, dim, generator=centres_gen).to(device)
    latent = (0.25 * torch.randn(16, dim, generator=centres_gen)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = torch.empty((n, dim), dtype=dtype, device=device)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        which = torch.randint(0, len(centres), (m,), generator=gen, device=device)
        x = centres[which] + torch.randn(m, 16, generator=gen, device=device) @ latent
        x += 0.05 * torch.randn(m, dim, generator=gen, device=device)
        out[start : start + m] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def build_ivf(keys: torch.Tensor, device: torch.device, workspace: int) -> tuple[TorchIVF, float]:
    """An IVF of ``4 sqrt(N)`` lists (a power of two, as the datastore build chooses) and its build seconds."""
    start = time.perf_counter()
    n = keys.shape[0]
    nlist = 1 << round(math.log2(4 * math.sqrt(n)))
    sample = keys[torch.randperm(n, generator=torch.Generator().manual_seed(1))[: 64 * nlist].to(device)]
    centroids = spherical_kmeans(sample, nlist)
    lists = torch.empty(n, dtype=torch.long, device=device)
    for s in range(0, n, _CHUNK):
        lists[s : s + _CHUNK] = (keys[s : s + _CHUNK].float() @ centroids.T).argmax(dim=1)
    order = torch.argsort(lists, stable=True)
    sizes = torch.bincount(lists, minlength=nlist)
    ivf = TorchIVF(
        centroids.cpu().numpy(), sizes.cpu().numpy(), order.cpu().numpy(), device, nprobe_for(nlist, n),
        keys=keys[order], workspace_bytes=workspace,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ivf, time.perf_counter() - start


def time_steps(search: Any, queries: torch.Tensor, batch: int, iters: int, warmup: int) -> dict[str, Any]:
    """p50/p99 of one step (search + the copy back) on random batches, its host waits, copies and memory."""
    device = queries.device
    copy = HostCopy()
    rng = np.random.default_rng(batch)
    rows = [torch.from_numpy(rng.choice(len(queries), batch, replace=False)) for _ in range(warmup + iters)]

    def step(i: int) -> list[np.ndarray]:
        return copy(search(queries[rows[i].to(device, non_blocking=True)], TOP_K))

    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    copies_before = copy.copies
    peak_mb = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    waits = count_host_waits(lambda: step(0), device)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ms = 1e3 * np.asarray(times)
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "copies_per_step": copy.copies - copies_before,
        "host_wait_ops_per_step": len(waits["host_wait_ops"]),
        "host_wait_ops": waits["host_wait_ops"],
        "cuda_syncs_per_step": waits["cuda_syncs"],
        "peak_transient_mb": peak_mb,
    }


def recall(ivf: TorchIVF, exact: ExactTorch, queries: torch.Tensor) -> float:
    """Mean share of the exact top-50 that TorchIVF finds."""
    got, want = ivf.search(queries, TOP_K)[1].cpu().numpy(), exact.search(queries, TOP_K)[1].cpu().numpy()
    return float(np.mean([len(np.intersect1d(g, w)) / TOP_K for g, w in zip(got, want, strict=True)]))


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Every key count and batch size; the report as a dict."""
    device = torch.device(args.device)
    results = []
    for n in args.keys:
        keys = synthetic_keys(n, args.dim, device, seed=2)
        queries = synthetic_keys(max(args.batch_sizes) * 4, args.dim, device, seed=3)
        ivf, build_s = build_ivf(keys, device, args.workspace_mb << 20)
        exact = ExactTorch(keys, args.workspace_mb << 20)
        online = OnlineStore(
            args.dim, 20, args.online_keys, device, ivf.coarse_map(), workspace_bytes=args.workspace_mb << 20
        )
        filler = synthetic_keys(args.online_keys, args.dim, device, seed=4)
        online.add_complete(filler, np.zeros((args.online_keys, 21), dtype=np.int32))
        searches = {"torch-ivf": ivf.search, "torch": exact.search, "online": online.search_tensors}
        entry = {
            "keys": n,
            "nlist": ivf.nlist,
            "nprobe": ivf.nprobe,
            "max_scan": ivf.max_scan,
            "build_s": build_s,
            "memory_mb": {"torch-ivf": ivf.memory_bytes() / 2**20, "torch": exact.memory_bytes() / 2**20},
            f"recall@{TOP_K}": recall(ivf, exact, queries[: args.recall_queries]),
            "online": {
                "keys": len(online),
                "lists": online.nlist,
                "probes": online.probes,
                "list_size": online.list_size,
            },
            "latency": {
                name: {str(b): time_steps(search, queries, b, args.iters, args.warmup) for b in args.batch_sizes}
                for name, search in searches.items()
            },
        }
        results.append(entry)
        print(_table(entry), flush=True)
        del keys, ivf, exact, online
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "workspace_mb": args.workspace_mb,
        "config": {k: v for k, v in vars(args).items()},
        "results": results,
    }


def _table(entry: dict[str, Any]) -> str:
    lines = [f"{entry['keys']} keys, IVF{entry['nlist']} nprobe {entry['nprobe']}, recall@50 {entry['recall@50']:.3f}"]
    for name, by_batch in entry["latency"].items():
        for batch, r in by_batch.items():
            peak = "-" if r["peak_transient_mb"] is None else f"{r['peak_transient_mb']:.0f} MB"
            lines.append(
                f"  {name:9s} batch {batch:>3s}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
                f"host waits {r['host_wait_ops_per_step']}, CUDA syncs {r['cuda_syncs_per_step']}, "
                f"copies {r['copies_per_step']}, peak {peak}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--keys", default="1000000,10000000", help="synthetic key counts (default: 1000000,10000000)")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--online-keys", type=int, default=100_000, help="keys in the online store (full)")
    p.add_argument("--workspace-mb", type=int, default=WORKSPACE_BYTES >> 20, help="transient memory ceiling")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--recall-queries", type=int, default=256)
    p.add_argument("--out", default="results/gpu_check.json")
    args = p.parse_args(argv)
    args.keys = [int(x) for x in args.keys.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; --device cpu runs the tiny mode", file=sys.stderr)
        return 2
    report = check(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
