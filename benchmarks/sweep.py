"""`dresd-bench sweep`: choose DReSD's settings by replay, on prompts that neither the datastore nor the eval set holds.

Every point of a grid of DReSD keys (`--grid KEY=V1,V2`, as `replay` takes them) is replayed on the
recorded greedy trajectories of tuning prompts: by default the embedded training prompts after those
the shipped ID corpus answers. A point is judged by its estimated speed over plain decoding at batch 1:
tokens per step over all steps, divided by the step time its verified draft tokens add at the price
that `dresd_vllm.spec.drafting` measured on a CPU (`TOKEN_COST`). Baselines in --methods are replayed once,
for reference. `compare` then measures the chosen point on the eval prompts, in tokens/s.
"""

from argparse import Namespace
from functools import partial
from pathlib import Path
from typing import Any

from dresd_vllm.spec.drafting import TOKEN_COST

from .compare import describe
from .inputs import Method, Prompts, Settings
from .replay import expand_grid, record_prompts, run_methods
from .report import finish, fmt, markdown_table, table

# The grid `sweep` replays when given none: how many neighbours, and the price a draft token must beat.
DEFAULT_GRID = ["top_k=10,50,100", "token_cost=0.02,0.04,0.08"]


def estimated_speedup(result: dict[str, Any], token_cost: float = TOKEN_COST["cpu"]) -> float:
    """Tokens per step over the step time its draft tokens add: speed over plain decoding at batch 1."""
    return result["tokens_per_step"] / (1 + token_cost * result["draft_tokens_per_step"])


def best(results: list[dict[str, Any]], entries: list[Method]) -> dict[str, dict[str, Any]]:
    """For each DReSD entry, its point with the highest estimated speedup, and that point's grid values."""
    out = {}
    for entry in entries:
        points = [r for r in results if r["kind"] == "dresd" and r["name"].startswith(f"{entry.name} ")]
        if points:
            top = max(points, key=lambda r: r["estimated_speedup"])
            grid = {k: v for k, v in top["speculative_config"].items() if k not in entry.speculative_config}
            out[entry.name] = dict(point=top["name"], estimated_speedup=top["estimated_speedup"], **grid)
    return out


HEADERS = ["point", "est. speedup", "tokens/step", "drafted steps", "draft tok/step", "accept len"]


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per point, best first."""
    return [
        [
            r["name"],
            fmt(r["estimated_speedup"], ".2f") + "x",
            fmt(r["tokens_per_step"]),
            fmt(r["drafted_step_share"], ".1%"),
            fmt(r["draft_tokens_per_step"]),
            fmt(r["mean_acceptance_length"]),
        ]
        for r in sorted(results, key=lambda r: -r["estimated_speedup"])
    ]


def run_sweep(args: Namespace, methods: list[Method], settings: Settings, prompts: Prompts) -> int:
    """The `sweep` command: replay every point, report, and name each DReSD entry's best point."""
    from .charts import sweep_chart

    out_dir = Path(args.out)
    trajectories = record_prompts(settings, prompts, out_dir / "cache")
    points = expand_grid(methods, args.grid or DEFAULT_GRID, best_of=False)
    print(f"sweep: {sum(p.speculative_config is not None for p in points)} points, by replay", flush=True)
    results = run_methods(points, settings, trajectories)
    for r in results:
        r["estimated_speedup"] = estimated_speedup(r)
    title = "sweep: " + describe(settings, prompts, batch=False)
    print(f"\n{title}\n")
    print(table(HEADERS, rows(results)))
    chosen = best(results, [m for m in methods if m.kind == "dresd"])
    for name, point in chosen.items():
        print(f"\nbest {name}: {point}")
    body = dict(
        settings=settings.to_json(),
        prompts=prompts.source,
        grid=args.grid or DEFAULT_GRID,
        token_cost=TOKEN_COST["cpu"],
        best=chosen,
        points=results,
    )
    charts = partial(sweep_chart, results, title, out_dir)
    return finish(out_dir, "sweep.json", body, markdown_table(HEADERS, rows(results)), charts, [])
