"""`dresd-bench compare`: every method in one process, one after the other, on the same prompts and settings.

Speedup is a ratio within the run (tokens/s over vanilla's, measured minutes apart on the same
machine). Under greedy decoding every method's output must equal vanilla's token for token; a
mismatch or a method that fails is reported and makes the command exit non-zero.
"""

import statistics
from argparse import Namespace
from functools import partial
from pathlib import Path
from typing import Any

from .inputs import Method, Prompts, Settings
from .offline import run_method
from .report import finish, fmt, markdown_table, table


def run_all(methods: list[Method], settings: Settings, prompts: Prompts, repeats: int = 1) -> list[dict[str, Any]]:
    """Run `methods` (vanilla first) `repeats` times, interleaved, and summarise each method's runs.

    Round r runs every method once, so load and thermal drift hit every method alike; each run has an
    engine of its own. A method's figures are the medians over its runs, with the spread (min, max) of
    the timed ones; speedup is taken within each round, against that round's vanilla.
    """
    runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    for round_ in range(repeats):
        for method in methods:
            print(
                f"\n=== round {round_ + 1}/{repeats}: {method.name}: {method.speculative_config or 'no speculation'}",
                flush=True,
            )
            runs[method.name].append(run_method(method, settings, prompts))
    vanilla = runs[methods[0].name]
    for name in runs:
        for run, ref in zip(runs[name], vanilla, strict=True):
            if run["status"] == "ok":
                run["speedup"] = run["tokens_per_s"] / ref["tokens_per_s"] if ref["status"] == "ok" else None
    results = [summarize(runs[m.name]) for m in methods]
    judge(results, settings.greedy)
    return results


# Figures that depend on timing, and so on the machine's load: reported as median with (min, max).
TIMED = ("tokens_per_s", "speedup", "elapsed_s", "engine_start_s", "proposer_ms_per_step", "proposer_share")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's result over its runs: the median of every figure, `spread` (min, max) of the timed ones.

    The outputs of every run are kept (`run_outputs`) for the lossless check; a failed run fails the method.
    """
    failed = next((r for r in runs if r["status"] != "ok"), None)
    if failed is not None:
        return {**failed, "repeats": len(runs)}
    out = {k: v for k, v in runs[0].items() if k != "outputs"}
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, int | float) and not isinstance(value, bool) and None not in values:
            out[key] = float(statistics.median(values))
    out["spread"] = {
        key: [min(r[key] for r in runs), max(r[key] for r in runs)]
        for key in TIMED
        if all(r.get(key) is not None for r in runs)
    }
    out["repeats"] = len(runs)
    out["runs"] = [{k: r.get(k) for k in (*TIMED, "output_tokens")} for r in runs]
    out["outputs"] = runs[0]["outputs"]
    out["run_outputs"] = [r["outputs"] for r in runs]
    return out


def judge(results: list[dict[str, Any]], greedy: bool) -> None:
    """Speedup over the vanilla result (where runs did not set it) and, under greedy decoding, the prompts
    whose output differs from vanilla's in any run."""
    vanilla = results[0]
    for r in results:
        if r["status"] != "ok":
            continue
        if r.get("speedup") is None:
            r["speedup"] = r["tokens_per_s"] / vanilla["tokens_per_s"] if vanilla["status"] == "ok" else None
        if greedy and vanilla["status"] == "ok":
            r["mismatched_prompts"] = sorted(
                {
                    i
                    for outputs in r.get("run_outputs", [r["outputs"]])
                    for i, (a, b) in enumerate(zip(outputs, vanilla["outputs"], strict=True))
                    if a != b
                }
            )
            r["lossless"] = not r["mismatched_prompts"]
        else:
            r["lossless"] = None  # sampled outputs differ by design; rejection sampling keeps the distribution


def failures(results: list[dict[str, Any]]) -> list[str]:
    """One line per failed method or lossless mismatch; empty when the run passed."""
    out = []
    for r in results:
        if r["status"] != "ok":
            out.append(f"{r['name']}: failed: {r['error']}")
        elif r["lossless"] is False:
            n = len(r["mismatched_prompts"])
            out.append(
                f"{r['name']}: greedy output differs from vanilla's on {n} prompt(s) {r['mismatched_prompts'][:10]}"
            )
    return out


def targets(results: list[dict[str, Any]], batch_size: int = 1) -> list[dict[str, Any]]:
    """The project's targets for each DReSD entry against the run's other (non-DReSD) methods.

    Judged on tokens per step over all steps, which decides speed (vLLM's acceptance length counts
    only drafted steps). Reported, never enforced: they are claims about a real model on its held-out
    prompts, not about any model and data. A target whose baseline is not in the run is None.
    """
    ok = [r for r in results if r["status"] == "ok"]
    others = [r for r in ok if r["kind"] != "dresd"]

    def per_step(kinds: tuple[str, ...]) -> float | None:
        return max((r["tokens_per_step"] for r in others if r["kind"] in kinds and r["tokens_per_step"]), default=None)

    rest, pld = per_step(("rest",)), per_step(("ngram", "suffix"))
    fastest_other = max(others, key=lambda o: o["tokens_per_s"], default=None)
    share_limit = 0.05 if batch_size == 1 else 0.10
    out = []
    for r in ok:
        if r["kind"] != "dresd" or not r["tokens_per_step"]:
            continue
        vs_rest = r["tokens_per_step"] / rest if rest else None
        vs_pld = r["tokens_per_step"] / pld if pld else None
        met = dict(
            tokens_per_step_vs_rest=None if vs_rest is None else vs_rest >= 1.3,
            tokens_per_step_vs_best_ngram_suffix=None if vs_pld is None else vs_pld >= 1.2,
            fastest=None if fastest_other is None else r["tokens_per_s"] > fastest_other["tokens_per_s"],
            proposer_share=None if r["proposer_share"] is None else r["proposer_share"] <= share_limit,
        )
        out.append(
            dict(
                method=r["name"],
                tokens_per_step_vs_rest=vs_rest,
                tokens_per_step_vs_best_ngram_suffix=vs_pld,
                fastest_other=fastest_other["name"] if fastest_other else None,
                proposer_share=r["proposer_share"],
                proposer_share_limit=share_limit,
                met=met,
                all_met=all(v is True for v in met.values()),
            )
        )
    return out


def target_lines(found: list[dict[str, Any]]) -> list[str]:
    """The targets in words, one line per DReSD entry."""
    lines = []
    for t in found:
        met = {k: {True: "met", False: "NOT met", None: "not measured"}[v] for k, v in t["met"].items()}
        lines.append(
            f"{t['method']}: tokens/step {fmt(t['tokens_per_step_vs_rest'])}x REST's (>= 1.3x: "
            f"{met['tokens_per_step_vs_rest']}), {fmt(t['tokens_per_step_vs_best_ngram_suffix'])}x the better "
            f"of ngram/suffix (>= 1.2x: {met['tokens_per_step_vs_best_ngram_suffix']}); faster than every other "
            f"method (fastest other: {t['fastest_other']}): {met['fastest']}; proposer share "
            f"{fmt(t['proposer_share'], '.1%')} (<= {t['proposer_share_limit']:.0%}: {met['proposer_share']})"
        )
    return lines


HEADERS = [
    "method", "tokens/s", "speedup", "tokens/step", "drafted steps", "draft tok/step", "accept len (vLLM)",
    "accept rate", "proposer ms/step", "proposer share", "runner", "lossless",
]  # fmt: skip


def spread(r: dict[str, Any], key: str, spec: str, suffix: str = "") -> str:
    """The median with its (min-max) over the runs when there were several: `1.14x (0.97-1.20)`."""
    value = fmt(r.get(key), spec, suffix)
    low_high = r.get("spread", {}).get(key)
    if r.get("repeats", 1) > 1 and low_high and value != "-":
        value += f" ({low_high[0]:{spec}}-{low_high[1]:{spec}})"
    return value


def runner(r: dict[str, Any]) -> str:
    """`V1` / `V2` (vLLM's model runner), `+async` where the engine scheduled asynchronously."""
    return (r.get("model_runner") or "-") + ("+async" if r.get("async_scheduling") else "")


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows, one per method."""
    out = []
    for r in results:
        if r["status"] != "ok":
            out.append([r["name"], "FAILED", *["-"] * (len(HEADERS) - 2)])
            continue
        out.append([
            r["name"],
            spread(r, "tokens_per_s", ".0f"),
            spread(r, "speedup", ".2f", "x"),
            fmt(r.get("tokens_per_step")),
            fmt(r.get("drafted_step_share"), ".0%"),
            fmt(r.get("draft_tokens_per_step")),
            fmt(r.get("mean_acceptance_length")),
            fmt(r.get("acceptance_rate"), ".1%"),
            fmt(r.get("proposer_ms_per_step"), ".3f"),
            fmt(r.get("proposer_share"), ".1%"),
            runner(r),
            {True: "yes", False: "NO", None: "n/a"}[r["lossless"]],
        ])  # fmt: skip
    return out


def position_rows(results: list[dict[str, Any]], k: int) -> tuple[list[str], list[list[str]]]:
    """Acceptance by draft position, one row per speculative method."""
    headers = ["method", *(f"p{i}" for i in range(1, k + 1))]
    body = [
        [r["name"], *(fmt(v, ".2f") for v in r["acceptance_by_position"])]
        + ["-"] * (k - len(r["acceptance_by_position"]))
        for r in results
        if r["status"] == "ok" and r.get("acceptance_by_position")
    ]
    return headers, body


def describe(settings: Settings, prompts: Prompts, batch: bool = True) -> str:
    """One line naming the model, data and settings (chart titles, README)."""
    skipped = f" after {prompts.source['skip']}" if prompts.source.get("skip") else ""
    return (
        f"{Path(settings.model).name}, {prompts.source['prompts']} prompts{skipped} of "
        f"{Path(prompts.source['dataset']).name}, "
        f"k={settings.num_speculative_tokens}, {settings.max_tokens} tokens, "
        + (f"batch {settings.batch_size}, " if batch else "")
        + ("greedy" if settings.greedy else f"T={settings.temperature}")
    )


def report(results: list[dict[str, Any]], settings: Settings, prompts: Prompts, out_dir: Path) -> int:
    """Print the tables, write `compare.json`, `table.md` and the charts; the exit status (1 on any failure)."""
    from .charts import compare_charts

    title = describe(settings, prompts)
    print(f"\n{title}\n")
    print(table(HEADERS, rows(results)))
    headers, body = position_rows(results, settings.num_speculative_tokens)
    if body:
        print("\nacceptance by draft position (share of drafts whose token i was accepted)\n")
        print(table(headers, body))
    found = targets(results, settings.batch_size)
    if found:
        print("\ntargets (reported, not enforced)")
        for line in target_lines(found):
            print(f"  {line}")
    methods = [{k: v for k, v in r.items() if k not in ("outputs", "run_outputs")} for r in results]
    body = dict(settings=settings.to_json(), prompts=prompts.source, methods=methods, targets=found)
    table_md = markdown_table(HEADERS, rows(results))
    charts = partial(compare_charts, results, title, out_dir)
    return finish(out_dir, "compare.json", body, table_md, charts, failures(results))


def run_compare(args: Namespace, methods: list[Method], settings: Settings, prompts: Prompts) -> int:
    """The `compare` command; returns the exit status."""
    results = run_all(methods, settings, prompts, args.repeats)
    return report(results, settings, prompts, Path(args.out))
