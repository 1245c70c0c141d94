"""Acceptance and proposer figures from vLLM's cumulative counters, as deltas over a measured window."""

from typing import Any

import numpy as np

SPEC_PREFIX = "vllm:spec_decode_"
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
PER_POSITION = "num_accepted_tokens_per_pos"


def spec_counters(metrics: list) -> dict[str, Any]:
    """vLLM's speculative counters from `LLM.get_metrics()`, summed over engines: the three counters and `per_pos`."""
    out: dict[str, Any] = dict.fromkeys(SPEC_COUNTERS, 0.0)
    per_pos: list[float] = []
    for metric in metrics:
        name = metric.name.removeprefix(SPEC_PREFIX)
        if name in SPEC_COUNTERS:
            out[name] += metric.value
        elif name == PER_POSITION:
            per_pos = _add(per_pos, metric.values)
    out["per_pos"] = per_pos
    return out


def _add(a: list[float], b: list[float]) -> list[float]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def acceptance(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Acceptance over the window between two `spec_counters` snapshots.

    acceptance_rate = accepted / draft tokens; mean_acceptance_length = 1 + accepted / drafts (tokens a
    step with a draft yields); acceptance_by_position[i] = drafts whose token i was accepted / drafts.
    """
    delta = {name: after[name] - before[name] for name in SPEC_COUNTERS}
    per_pos = _add(after["per_pos"], [-v for v in before["per_pos"]])
    drafts, draft_tokens, accepted = delta["num_drafts"], delta["num_draft_tokens"], delta["num_accepted_tokens"]
    return dict(
        drafts=int(drafts),
        draft_tokens=int(draft_tokens),
        accepted_tokens=int(accepted),
        acceptance_rate=accepted / draft_tokens if draft_tokens else None,
        mean_acceptance_length=1 + accepted / drafts if drafts else None,
        acceptance_by_position=[v / drafts for v in per_pos] if drafts else [],
    )


def per_step(
    output_tokens: int, accepted: dict[str, Any] | None, request_steps: int | None = None
) -> dict[str, float | None]:
    """What decides speed, over every step of every request (vLLM's acceptance length counts only drafted steps).

    `request_steps`: the steps each request was scheduled in, summed over requests (the prefill step that
    yields the first token included). Without it, output tokens - accepted tokens, since each step yields
    one sampled token plus the draft tokens accepted in it; vLLM counts the accepted tokens of a last step
    that max_tokens or a stop token cut, so that estimate runs a little high on short outputs.
    tokens_per_step = output tokens / steps; drafted_step_share = steps with a draft / steps;
    draft_tokens_per_step = draft tokens verified / steps (the verification cost). `accepted` is
    `acceptance()`'s result, None without speculation.
    """
    if accepted is None:
        return dict(tokens_per_step=1.0 if output_tokens else None, drafted_step_share=0.0, draft_tokens_per_step=0.0)
    steps = request_steps if request_steps is not None else output_tokens - accepted["accepted_tokens"]
    if steps <= 0:
        return dict(tokens_per_step=None, drafted_step_share=None, draft_tokens_per_step=None)
    return dict(
        tokens_per_step=output_tokens / steps,
        drafted_step_share=accepted["drafts"] / steps,
        draft_tokens_per_step=accepted["draft_tokens"] / steps,
    )


# `dresd_stats` entries that are a value now, not a count: the window reports their value at its end.
GAUGES = ("online_keys", "token_price")


def stats_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """The window's share of a proposer's cumulative `dresd_stats`: counters and seconds as deltas,
    each `X_s` also as `X_ms_per_step`; gauges (:data:`GAUGES`, by prefix) as their last value. Ratios
    of the cumulative dict are dropped, not subtracted."""
    if before is None or after is None:
        return None
    delta = {
        key: value if key.startswith(GAUGES) else value - before.get(key, 0)
        for key, value in after.items()
        if isinstance(value, int | float) and not key.endswith(("_per_step", "_share", "_per_request"))
    }
    steps = delta.get("steps", 0)
    for key in [k for k in delta if k.endswith("_s")]:
        delta[f"{key[:-2]}_ms_per_step"] = 1e3 * delta[key] / steps if steps else 0.0
    return delta


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """`{"p50": ..., "p90": ..., "p99": ...}` of `values` (None when there are none)."""
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}
