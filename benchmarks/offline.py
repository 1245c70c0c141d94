"""One method on an offline `vllm.LLM`: a warm-up, a timed run over every prompt, and what was counted meanwhile.

The proposer is timed the same way for every method: the worker's `propose_draft_token_ids`, which
vLLM calls once per step to draft for the whole batch, is wrapped on that one runner object by
`dresd_vllm.patches.proposer_timer` (through `collective_rpc`, so it works in a separate engine
process too). The caller sets the environment first (`inputs.engine_environment(offline=True)`).
"""

import gc
import time
import traceback
from typing import Any

from dresd_vllm import patches

from .inputs import Method, Prompts, Settings, engine_kwargs
from .metrics import acceptance, per_step, spec_counters, stats_delta


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
        llm.collective_rpc(patches.apply_to_runner, args=("proposer_timer",))
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
            # None where the runner has no drafter call to clock (see dresd_vllm.patches.timer).
            proposer_ms_per_step=1e3 * seconds / steps if steps else None,
            proposer_share=seconds / elapsed if steps else None,
            proposer_stats=stats_delta(before["stats"], after["stats"]),
        )
    return out


def _snapshot(llm) -> dict[str, Any]:
    """The cumulative counters: vLLM's speculative metrics, our proposer clock, the proposer's own stats."""
    return dict(
        counters=spec_counters(llm.get_metrics()),
        timer=llm.collective_rpc(patches.read_proposer_timer)[0],
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
