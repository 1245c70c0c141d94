"""The proposer timer of `dresd_vllm.patches`, for `dresd-bench` only: a clock and step counters on one model runner."""

import functools
import time
from typing import Any

import torch

from . import _patch, logger


@_patch("propose_draft_token_ids or speculator.propose, execute_model", per_runner=True)
def proposer_timer(runner: Any) -> bool:
    """Put a clock and counters on this runner's drafter call, and count the request steps (requests
    scheduled, summed over steps) in `execute_model`; False when it already was.

    The drafter call is the V1 runner's `propose_draft_token_ids` (every custom_class method runs there) or,
    on vLLM 0.33's model runner V2 (its default for `ngram` and `draft_model`), which has no such method,
    its speculator's `propose`; the V2 runner's warm-up calls (`dummy_run`) are not counted. A runner with
    neither gets the step counter only: its drafter calls read 0, which the benchmark reports as no clock.

    The request steps are what tokens per step divides by (vLLM's accepted-token counter also counts
    tokens that max_tokens cut). They are counted in `execute_model`, which runs every step, not in
    the drafter: vLLM skips the drafter in a step whose longest sequence + k exceeds max_model_len
    (`_input_fits_in_drafter`) and schedules k placeholder (zero) draft tokens for the next step
    instead, which its spec-decode counters count as a draft.
    """
    if hasattr(runner, "proposer_timer"):
        return False
    owner, name = drafter_call(runner)
    execute = runner.execute_model
    runner.proposer_timer = [0, 0.0, 0]
    # A GPU drafter returns before its kernels finish; wait for them so its time is counted, not deferred.
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)

    @functools.wraps(execute)
    def counted(*args, **kwargs):
        if not kwargs.get("dummy_run"):
            scheduler_output = args[0] if args else kwargs["scheduler_output"]
            runner.proposer_timer[2] += len(scheduler_output.num_scheduled_tokens)
        return execute(*args, **kwargs)

    runner.execute_model = counted
    if owner is None or name is None:
        logger.warning(
            "dresd-vllm: %s has neither propose_draft_token_ids nor speculator.propose: dresd-bench counts its "
            "steps but cannot time its drafter", type(runner).__name__,
        )  # fmt: skip
        return True
    propose = getattr(owner, name)

    @functools.wraps(propose)
    def timed(*args, **kwargs):
        if kwargs.get("dummy_run"):
            return propose(*args, **kwargs)
        sync()
        start = time.perf_counter()
        try:
            return propose(*args, **kwargs)
        finally:
            sync()
            runner.proposer_timer[0] += 1
            runner.proposer_timer[1] += time.perf_counter() - start

    setattr(owner, name, timed)
    return True


def drafter_call(runner: Any) -> tuple[Any, str] | tuple[None, None]:
    """(object, method name) of the call in which this runner drafts, or (None, None) where there is none."""
    if callable(getattr(runner, "propose_draft_token_ids", None)):
        return runner, "propose_draft_token_ids"
    speculator = getattr(runner, "speculator", None)
    if callable(getattr(speculator, "propose", None)):
        return speculator, "propose"
    return None, None


def read_proposer_timer(worker: Any) -> tuple[int, float, int]:
    """Runs in the worker: (drafter calls, seconds in them, request steps) counted by `proposer_timer`."""
    steps, seconds, request_steps = worker.model_runner.proposer_timer
    return steps, seconds, request_steps
