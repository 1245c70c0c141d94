"""PNG charts of the benchmark results (matplotlib, Agg: no display needed)."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COLORS = {
    "vanilla": "#7f7f7f", "ngram": "#1f77b4", "suffix": "#ff7f0e", "draft_model": "#9467bd", "rest": "#2ca02c",
    "dresd": "#d62728",
}  # fmt: skip


def _color(result: dict[str, Any], i: int = 0) -> str:
    # Several DReSD datastores share the DReSD red, shaded darker per entry.
    base = matplotlib.colors.to_rgb(COLORS.get(result["kind"], "#17becf"))
    return matplotlib.colors.to_hex([c * (1 - 0.3 * i) for c in base])


def _shade(results: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, int] = {}
    colors = []
    for r in results:
        colors.append(_color(r, seen.get(r["kind"], 0)))
        seen[r["kind"]] = seen.get(r["kind"], 0) + 1
    return colors


def _save(fig: Any, path: Path, title: str | None = None) -> Path:
    """Title (when given), lay out, write and close one figure."""
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(
    ax,
    names: list[str],
    values: list[float],
    colors: list[str],
    ylabel: str,
    baseline: float,
    spreads: list[list[float] | None] | None = None,
) -> None:
    # Error bars span each value's (min, max) over the repeated runs.
    yerr = None
    if spreads and any(spreads):
        yerr = [
            [v - (s or (v, v))[0] for v, s in zip(values, spreads, strict=True)],
            [(s or (v, v))[1] - v for v, s in zip(values, spreads, strict=True)],
        ]
    bars = ax.bar(names, values, color=colors, yerr=yerr, capsize=4 if yerr else 0, ecolor="black")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=8)
    ax.axhline(baseline, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    top = max([*values, baseline, *(s[1] for s in (spreads or []) if s)])
    ax.set_ylim(0, top * 1.18)


def compare_charts(results: list[dict[str, Any]], title: str, out_dir: Path) -> list[Path]:
    """`speedup.png` (speedup with its spread over runs; tokens per step over all steps next to vLLM's mean
    acceptance length) and `acceptance_by_position.png`."""
    ok = [r for r in results if r["status"] == "ok"]
    colors = _shade(ok)
    repeats = max((r.get("repeats", 1) for r in ok), default=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    _bars(
        left,
        [r["name"] for r in ok],
        [r["speedup"] for r in ok],
        colors,
        "speedup over vanilla (tokens/s)" + (f"\nmedian of {repeats} runs, bars: min-max" if repeats > 1 else ""),
        1.0,
        [r.get("spread", {}).get("speedup") for r in ok],
    )
    # Tokens per step over all steps (what decides speed) beside vLLM's mean acceptance length, which
    # counts only the steps that had a draft; vanilla yields one token per step, the dashed line.
    spec = [(r, c) for r, c in zip(ok, colors, strict=True) if r.get("mean_acceptance_length") is not None]
    x = range(len(spec))
    per_step = [r.get("tokens_per_step") or 1.0 for r, _ in spec]
    vllm_len = [r["mean_acceptance_length"] for r, _ in spec]
    bars = right.bar(
        [i - 0.2 for i in x], per_step, width=0.4, color=[c for _, c in spec], label="tokens/step (all steps)"
    )
    right.bar_label(bars, labels=[f"{v:.2f}" for v in per_step], padding=2, fontsize=7)
    bars = right.bar(
        [i + 0.2 for i in x],
        vllm_len,
        width=0.4,
        color=[c for _, c in spec],
        alpha=0.35,
        hatch="//",
        label="vLLM mean acceptance length (drafted steps)",
    )
    right.bar_label(bars, labels=[f"{v:.2f}" for v in vllm_len], padding=2, fontsize=7)
    right.set_xticks(list(x), [r["name"] for r, _ in spec], rotation=30)
    right.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    right.set_ylabel("tokens per step")
    right.set_ylim(0, max([*per_step, *vllm_len, 1.0]) * 1.25)
    right.legend(fontsize=7, loc="upper right")
    paths = [_save(fig, out_dir / "speedup.png", title)]

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r, c in spec:
        curve = r["acceptance_by_position"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, color=c, label=r["name"])
    ax.set_xlabel("draft position")
    ax.set_ylabel("share of drafts whose token at this position was accepted")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    paths.append(_save(fig, out_dir / "acceptance_by_position.png"))
    return paths


def serve_charts(results: list[dict[str, Any]], title: str, out_dir: Path) -> list[Path]:
    """`serve.png`: output tokens/s and p50 request latency against concurrency, one line per method."""
    ok = [r for r in results if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r, c in zip(ok, _shade(ok), strict=True):
        levels = r["levels"]
        x = [level["concurrency"] for level in levels]
        left.plot(x, [level["output_tokens_per_s"] for level in levels], marker="o", color=c, label=r["name"])
        right.plot(x, [level["latency_s"]["p50"] for level in levels], marker="o", color=c, label=r["name"])
    for ax, ylabel in ((left, "output tokens/s"), (right, "request latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    return [_save(fig, out_dir / "serve.png", title)]


def sweep_chart(rows: list[dict[str, Any]], title: str, out_dir: Path) -> list[Path]:
    """`sweep.png`: every replayed point's estimated speedup and tokens per step, best first."""
    rows = sorted(rows, key=lambda r: r["estimated_speedup"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.3 * len(rows)), sharey=True)
    names = [r["name"] for r in rows]
    axes[0].barh(names, [r["estimated_speedup"] for r in rows], color="tab:blue")
    axes[0].axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes[0].set_xlabel("estimated speedup over plain decoding (batch 1)")
    axes[1].barh(names, [r["tokens_per_step"] for r in rows], color="tab:green")
    axes[1].set_xlabel("tokens per step (all steps)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="y", labelsize=7)
    return [_save(fig, out_dir / "sweep.png", title)]
