"""`dresd-bench serve`: every method behind vLLM's OpenAI server, driven by the `openai` async client.

For each method one server is started (127.0.0.1, stopped by its pid), then each concurrency level
runs a bounded number of streamed completion requests from that many concurrent clients. Requests
send the prompt token ids, so every method sees the inputs of `compare`, and ask for the output
token ids back (`return_token_ids`), so greedy outputs can be checked against vanilla's request by
request. Acceptance comes from the server's `/metrics`, as deltas over each level.
"""

import asyncio
import contextlib
import json
import math
import random
import time
import traceback
import urllib.request
from argparse import Namespace
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from build_tools.data import InputError

from .inputs import Method, Prompts, Settings, engine_kwargs
from .metrics import PER_POSITION, SPEC_COUNTERS, SPEC_PREFIX, acceptance, per_step, percentiles
from .report import finish, fmt, markdown_table, table
from .server import engine_flags, vllm_server


def scrape(base_url: str) -> dict[str, Any]:
    """The server's speculative counters from `/metrics`, in the form of `metrics.spec_counters`."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, Any] = dict.fromkeys(SPEC_COUNTERS, 0.0)
    per_pos: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix(SPEC_PREFIX)
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # the `_created` timestamps of each counter
            if name in SPEC_COUNTERS:
                out[name] += sample.value
            elif name == PER_POSITION:
                position = int(sample.labels["position"])
                per_pos[position] = per_pos.get(position, 0.0) + sample.value
    out["per_pos"] = [per_pos.get(i, 0.0) for i in range(max(per_pos, default=-1) + 1)]
    return out


async def _request(client, model: str, settings: Settings, prompt: list[int], seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    tokens: list[int] = []
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=None if settings.greedy else seed,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    async for chunk in stream:
        ids = getattr(chunk.choices[0], "token_ids", None) if chunk.choices else None
        if ids:
            first = first or time.perf_counter()
            tokens += ids
    end = time.perf_counter()
    return dict(
        tokens=tokens,
        latency_s=end - start,
        ttft_s=(first or end) - start,
        tpot_s=(end - first) / (len(tokens) - 1) if first and len(tokens) > 1 else None,
    )


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of `request_rate`
    requests/s (exponential gaps, seeded, as `vllm bench serve` sends them), or all at 0 when it is inf."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = random.Random(seed).expovariate
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += gaps(request_rate)
    return times


async def run_level(
    base_url: str,
    settings: Settings,
    prompts: Prompts,
    concurrency: int,
    num_requests: int,
    request_rate: float = math.inf,
    model: str | None = None,
    first: int = 0,
) -> dict[str, Any]:
    """`num_requests` requests (the prompts in turn from prompt `first`), at most `concurrency` in flight, sent
    at `request_rate` requests/s (Poisson arrivals; inf: all at once), after one warm-up. `model`: the served
    model's name."""
    import openai

    model = model or settings.model
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=3600)
    try:
        await _request(client, model, settings, prompts.warmup, settings.seed)
        before = scrape(base_url)
        slots = asyncio.Semaphore(concurrency)
        arrivals = arrival_times(num_requests, request_rate, settings.seed)

        async def one(i: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            async with slots:
                prompt = prompts.token_ids[(first + i) % len(prompts.token_ids)]
                return await _request(client, model, settings, prompt, settings.seed + first + i)

        start = time.perf_counter()
        records = await asyncio.gather(*(one(i) for i in range(num_requests)))
        elapsed = time.perf_counter() - start
        after = scrape(base_url)
    finally:
        await client.close()
    output_tokens = sum(len(r["tokens"]) for r in records)
    accepted = acceptance(before, after)
    return dict(
        concurrency=concurrency,
        first_prompt=first % len(prompts.token_ids),
        request_rate=None if math.isinf(request_rate) else request_rate,
        requests=num_requests,
        output_tokens=output_tokens,
        elapsed_s=elapsed,
        output_tokens_per_s=output_tokens / elapsed,
        requests_per_s=num_requests / elapsed,
        latency_s=percentiles([r["latency_s"] for r in records]),
        ttft_s=percentiles([r["ttft_s"] for r in records]),
        tpot_ms=percentiles([1e3 * r["tpot_s"] for r in records if r["tpot_s"] is not None]),
        **accepted,
        # A server without speculation counts no drafts: one token per step.
        **per_step(output_tokens, accepted if accepted["drafts"] else None),
        outputs=[r["tokens"] for r in records],
    )


def _levels(
    base_url: str,
    settings: Settings,
    prompts: Prompts,
    levels: list[int],
    num_requests: int,
    request_rate: float,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Every concurrency level in turn against the server at `base_url` (at least one request per client).

    Each level goes on from the prompts the last one sent, so that with enough prompts no level meets
    answers a stateful drafter (an online store, a global suffix tree) has just served."""
    results, first = [], 0
    for c in levels:
        requests = max(num_requests, c)
        results.append(asyncio.run(run_level(base_url, settings, prompts, c, requests, request_rate, model, first)))
        first += requests
    return results


@contextlib.contextmanager
def _status(result: dict[str, Any], where: str = "") -> Iterator[None]:
    """Set `result["status"]`: "ok" when the block ends, else "failed" with the error and `where` to look.

    The error is recorded instead of raised, so one method's failure does not end the others' runs.
    """
    try:
        yield
        result["status"] = "ok"
    except Exception as e:
        traceback.print_exc()
        result.update(status="failed", error=f"{type(e).__name__}: {e}{where}")


def serve_method(
    method: Method,
    settings: Settings,
    prompts: Prompts,
    levels: list[int],
    num_requests: int,
    out_dir: Path,
    request_rate: float = math.inf,
) -> dict[str, Any]:
    """One server for `method`, every concurrency level in turn; `status` "failed" (with `error`) instead of raising."""
    result: dict[str, Any] = dict(name=method.name, kind=method.kind, speculative_config=method.speculative_config)
    flags = engine_flags(engine_kwargs(settings, max_num_seqs=max(levels)))
    if method.speculative_config is not None:
        flags += ["--speculative-config", json.dumps(method.speculative_config)]
    log = out_dir / f"server-{method.name}.log"
    with _status(result, f" (server log: {log})"):
        start = time.perf_counter()
        with vllm_server(settings.model, *flags, log=log) as base_url:
            result["server_start_s"] = time.perf_counter() - start
            result["levels"] = _levels(base_url, settings, prompts, levels, num_requests, request_rate)
    return result


def served_model(base_url: str) -> str:
    """The name a running server serves its model under (`/v1/models`); InputError if none answers there."""
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise InputError(f"--base-url {base_url}: no OpenAI-compatible server answers /v1/models ({e})") from e


def serve_running(
    base_url: str, settings: Settings, prompts: Prompts, levels: list[int], num_requests: int, request_rate: float
) -> dict[str, Any]:
    """Every level against a server started elsewhere (`vllm serve ...`); no lossless check (no vanilla to compare)."""
    model = served_model(base_url)
    result: dict[str, Any] = dict(name=f"server {base_url}", kind="server", speculative_config=None, model=model)
    with _status(result):
        result["levels"] = _levels(base_url, settings, prompts, levels, num_requests, request_rate, model)
    return result


def judge(results: list[dict[str, Any]], greedy: bool) -> list[str]:
    """Speedup over vanilla per level and the lossless check; returns one line per failure."""
    vanilla = results[0] if results and results[0]["kind"] == "vanilla" else {}
    problems = []
    for r in results:
        if r["status"] != "ok":
            problems.append(f"{r['name']}: failed: {r['error']}")
            continue
        for level, ref in zip(r["levels"], vanilla.get("levels") or [None] * len(r["levels"]), strict=True):
            level["speedup"] = level["output_tokens_per_s"] / ref["output_tokens_per_s"] if ref else None
            if not (greedy and ref):
                level["lossless"] = None
                continue
            level["mismatched_requests"] = [
                i for i, (a, b) in enumerate(zip(level["outputs"], ref["outputs"], strict=True)) if a != b
            ]
            level["lossless"] = not level["mismatched_requests"]
            if not level["lossless"]:
                problems.append(
                    f"{r['name']} at concurrency {level['concurrency']}: greedy output differs from vanilla's "
                    f"on {len(level['mismatched_requests'])} request(s) {level['mismatched_requests'][:10]}"
                )
    return problems


HEADERS = [
    "method", "concurrency", "tokens/s", "speedup", "req/s", "latency p50 s", "latency p99 s", "TTFT p50 s",
    "TPOT p50 ms", "tokens/step", "accept len (vLLM)", "lossless",
]  # fmt: skip


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows, one per method and concurrency level."""
    out = []
    for r in results:
        if r["status"] != "ok":
            out.append([r["name"], "FAILED", *["-"] * (len(HEADERS) - 2)])
            continue
        for level in r["levels"]:
            out.append([
                r["name"],
                str(level["concurrency"]),
                fmt(level["output_tokens_per_s"], ".0f"),
                fmt(level["speedup"], ".2f", "x"),
                fmt(level["requests_per_s"], ".2f"),
                fmt(level["latency_s"]["p50"], ".3f"),
                fmt(level["latency_s"]["p99"], ".3f"),
                fmt(level["ttft_s"]["p50"], ".3f"),
                fmt(level["tpot_ms"]["p50"], ".2f"),
                fmt(level["tokens_per_step"]),
                fmt(level["mean_acceptance_length"]),
                {True: "yes", False: "NO", None: "n/a"}[level["lossless"]],
            ])  # fmt: skip
    return out


def run_serve(args: Namespace, methods: list[Method], settings: Settings, prompts: Prompts) -> int:
    """The `serve` command; returns the exit status (1 on a failed method or a lossless mismatch)."""
    from .charts import serve_charts
    from .compare import describe

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = sorted(set(args.concurrency))
    if args.base_url:
        results = [serve_running(args.base_url, settings, prompts, levels, args.requests, args.request_rate)]
    else:
        results = []
        for method in methods:
            print(f"\n=== {method.name}: {method.speculative_config or 'no speculation'}", flush=True)
            results.append(serve_method(method, settings, prompts, levels, args.requests, out_dir, args.request_rate))
    problems = judge(results, settings.greedy and not args.base_url)

    rate = "" if math.isinf(args.request_rate) else f", {args.request_rate:g} req/s (Poisson)"
    title = describe(settings, prompts, batch=False) + f", served, {args.requests} requests/level{rate}"
    print(f"\n{title}\n")
    print(table(HEADERS, rows(results)))
    for r in results:
        for level in r.get("levels", []):
            level.pop("outputs")
    body = dict(
        settings=settings.to_json(),
        prompts=prompts.source,
        concurrency=levels,
        requests=args.requests,
        request_rate=None if math.isinf(args.request_rate) else args.request_rate,
        base_url=args.base_url,
        methods=results,
    )
    table_md = markdown_table(HEADERS, rows(results))
    charts = partial(serve_charts, results, title, out_dir)
    return finish(out_dir, "serve.json", body, table_md, charts, problems)
