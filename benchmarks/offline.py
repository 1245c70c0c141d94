"""One method on an offline `vllm.LLM`: a warm-up, a timed run over every prompt, and what was counted meanwhile.

The proposer is timed the same way for every method: the worker's `propose_draft_token_ids`, which
vLLM calls once per step to draft for the whole batch, is wrapped on that one runner object
(through `collective_rpc`, so it works in a separate engine process too). vLLM's engine itself is
left as it is; the DReSD patches stay in `dresd_vllm.patches`.
"""

import gc
import os
import time
import traceback
from typing import Any

from .inputs import Method, Prompts, Settings, engine_kwargs
from .metrics import acceptance, per_step, spec_counters, stats_delta

# In-process engines start in seconds rather than ~20 s on the CPU; the user's environment wins.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# With a separate engine process, collective_rpc ships our worker functions (`_time_proposer`, ...) by
# msgpack, which refuses functions unless vLLM may fall back to pickle; they are our own code, sent to
# the engine this process started.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def run_method(method: Method, settings: Settings, prompts: Prompts) -> dict[str, Any]:
    """Run `method` over `prompts`; the result has `status` "ok" or "failed" (with `error`), never raises.

    A failed method is part of the report (and makes the run fail), so one broken method does not
    hide the figures of the others.
    """
    import vllm.envs
    from vllm import LLM

    result: dict[str, Any] = dict(name=method.name, kind=method.kind, speculative_config=method.speculative_config)
    # vLLM caches its environment once an engine is up; clear it so each engine reads ours.
    vllm.envs.disable_envs_cache()
    llm = None
    try:
        start = time.perf_counter()
        llm = LLM(
            model=settings.model,
            speculative_config=method.speculative_config,
            disable_log_stats=False,
            **engine_kwargs(settings, max_num_seqs=settings.batch_size),
        )
        result["engine_start_s"] = time.perf_counter() - start
        result.update(runner_of(llm))
        result.update(_measure(llm, method, settings, prompts))
        result["status"] = "ok"
    except Exception as e:
        traceback.print_exc()
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return result


def runner_of(llm) -> dict[str, Any]:
    """Which model runner and scheduling the engine chose: on GPU builds vLLM picks them per method.

    (vLLM 0.33 on a GPU runs vanilla, ngram and draft_model on Model Runner V2 with async scheduling,
    custom_class methods and suffix on the V1 runner without it; see `--same-runner`.)
    """
    config = llm.llm_engine.vllm_config
    return dict(
        model_runner="V2" if config.use_v2_model_runner else "V1",
        model_runner_class=llm.collective_rpc(_runner_class)[0],
        async_scheduling=bool(config.scheduler_config.async_scheduling),
    )


def _runner_class(worker) -> str:
    runner = type(worker.model_runner)
    return f"{runner.__module__}.{runner.__qualname__}"


def _measure(llm, method: Method, settings: Settings, prompts: Prompts) -> dict[str, Any]:
    speculative = method.speculative_config is not None
    if speculative:
        llm.collective_rpc(_time_proposer)
    llm.generate(
        [{"prompt_token_ids": prompts.warmup}], _params(settings, 1, min(settings.max_tokens, 32)), use_tqdm=False
    )
    before = _snapshot(llm) if speculative else None
    start = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts.token_ids],
        _params(settings, len(prompts.token_ids), settings.max_tokens),
        use_tqdm=False,
    )
    elapsed = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    output_tokens = sum(map(len, tokens))
    out: dict[str, Any] = dict(
        outputs=tokens,
        output_tokens=output_tokens,
        elapsed_s=elapsed,
        tokens_per_s=output_tokens / elapsed,
        **per_step(output_tokens, None),
    )
    if speculative:
        after = _snapshot(llm)
        steps, seconds, request_steps = (a - b for a, b in zip(after["timer"], before["timer"], strict=True))
        accepted = acceptance(before["counters"], after["counters"])
        out.update(
            **accepted,
            request_steps=request_steps,
            **per_step(output_tokens, accepted, request_steps),
            proposer_steps=steps,
            proposer_s=seconds,
            proposer_ms_per_step=1e3 * seconds / steps if steps else None,
            proposer_share=seconds / elapsed,
            proposer_stats=stats_delta(before["stats"], after["stats"]),
        )
    return out


def _snapshot(llm) -> dict[str, Any]:
    """The cumulative counters: vLLM's speculative metrics, our proposer clock, the proposer's own stats."""
    return dict(
        counters=spec_counters(llm.get_metrics()),
        timer=llm.collective_rpc(_read_timer)[0],
        stats=llm.collective_rpc("dresd_stats")[0],
    )


def _params(settings: Settings, n: int, max_tokens: int) -> list:
    from vllm import SamplingParams

    # One seed per request makes sampled runs repeatable whatever the batch order.
    return [
        SamplingParams(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=max_tokens,
            seed=None if settings.greedy else settings.seed + i,
        )
        for i in range(n)
    ]


def _time_proposer(worker) -> None:
    """Runs in the worker: wrap this runner's `propose_draft_token_ids` with counters and a clock, and
    count the request steps (requests scheduled, summed over steps) in `execute_model`.

    The request steps are what tokens per step divides by (vLLM's accepted-token counter also counts
    tokens that max_tokens cut). They are counted in `execute_model`, which runs every step, not in
    the drafter: vLLM skips the drafter in a step whose longest sequence + k exceeds max_model_len
    (`_input_fits_in_drafter`) and schedules k placeholder (zero) draft tokens for the next step
    instead, which its spec-decode counters count as a draft.
    """
    import torch

    runner = worker.model_runner
    propose = runner.propose_draft_token_ids
    execute = runner.execute_model
    runner.bench_proposer_timer = [0, 0.0, 0]
    # A GPU drafter returns before its kernels finish; wait for them so its time is counted, not deferred.
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)

    def counted(*args, **kwargs):
        scheduler_output = args[0] if args else kwargs["scheduler_output"]
        runner.bench_proposer_timer[2] += len(scheduler_output.num_scheduled_tokens)
        return execute(*args, **kwargs)

    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return propose(*args, **kwargs)
        finally:
            sync()
            runner.bench_proposer_timer[0] += 1
            runner.bench_proposer_timer[1] += time.perf_counter() - start

    runner.propose_draft_token_ids = timed
    runner.execute_model = counted


def _read_timer(worker) -> tuple[int, float, int]:
    steps, seconds, request_steps = worker.model_runner.bench_proposer_timer
    return steps, seconds, request_steps
