"""`dresd-bench sweep`: DReSD over num_speculative_tokens x top_k x min_support, to pick defaults from measurements.

Each point is a run of `compare` (same prompts, settings and lossless check against one vanilla run);
baselines given in --methods are swept over k only. The best point of each entry is the fastest
that kept every greedy output.
"""

from argparse import Namespace
from functools import partial
from pathlib import Path
from typing import Any

from .compare import HEADERS as COMPARE_HEADERS
from .compare import failures, run_all
from .compare import rows as compare_rows
from .inputs import Method, Prompts, Settings
from .report import finish, markdown_table, table


def grid(methods: list[Method], ks: list[int], top_ks: list[int], min_supports: list[float]) -> list[Method]:
    """vanilla, then every method at every k; DReSD entries also at every top_k x min_support."""
    out = [methods[0]]
    for m in methods[1:]:
        for k in ks:
            config = {**m.speculative_config, "num_speculative_tokens": k}
            if m.kind != "dresd":
                out.append(Method(f"{m.name} k={k}", m.kind, config))
                continue
            for top_k in top_ks:
                for support in min_supports:
                    name = f"{m.name} k={k} top_k={top_k} min_support={support}"
                    out.append(Method(name, m.kind, {**config, "top_k": top_k, "min_support": support}))
    return out


def best(results: list[dict[str, Any]], entries: list[Method]) -> dict[str, dict[str, Any]]:
    """For each entry, its fastest point that ran and was lossless (or not checked): name and settings."""
    out = {}
    for entry in entries:
        points = [
            r
            for r in results
            if r["name"].startswith(f"{entry.name} ") and r["status"] == "ok" and r["lossless"] is not False
        ]
        if points:
            top = max(points, key=lambda r: r["tokens_per_s"])
            config = {k: v for k, v in top["speculative_config"].items() if k not in entry.speculative_config}
            out[entry.name] = dict(
                point=top["name"],
                speedup=top["speedup"],
                mean_acceptance_length=top["mean_acceptance_length"],
                **config,
            )
    return out


HEADERS = ["point", *COMPARE_HEADERS[1:]]


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per point, fastest first (failed points last)."""
    return compare_rows(sorted(results, key=lambda r: -r["tokens_per_s"] if r["status"] == "ok" else float("inf")))


def run_sweep(args: Namespace, methods: list[Method], settings: Settings, prompts: Prompts) -> int:
    """The `sweep` command; returns the exit status (1 on a failed point or a lossless mismatch)."""
    from .charts import sweep_chart

    out_dir = Path(args.out)
    points = grid(methods, args.k, args.top_k, args.min_support)
    print(f"sweep: {len(points)} runs", flush=True)
    results = run_all(points, settings, prompts, args.repeats)
    title = (
        f"{Path(settings.model).name}, {prompts.source['prompts']} prompts of "
        f"{Path(prompts.source['dataset']).name}, {settings.max_tokens} tokens, batch {settings.batch_size}, "
        + ("greedy" if settings.greedy else f"T={settings.temperature}")
    )
    print(f"\n{title}\n")
    print(table(HEADERS, rows(results)))
    chosen = best(results, methods[1:])
    for name, point in chosen.items():
        print(f"\nbest {name}: {point}")
    body = dict(
        settings={**settings.to_json(), "num_speculative_tokens": args.k},
        grid=dict(k=args.k, top_k=args.top_k, min_support=args.min_support),
        prompts=prompts.source,
        best=chosen,
        points=[{k: v for k, v in r.items() if k not in ("outputs", "run_outputs")} for r in results],
    )
    table_md = markdown_table(HEADERS, rows(results))
    charts = partial(sweep_chart, results, title, out_dir)
    return finish(out_dir, "sweep.json", body, table_md, charts, failures(results))
