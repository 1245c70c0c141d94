"""Patch 6 of `dresd_vllm.patches`, for `dresd-bench` only: a clock and step counters on one model runner."""

import functools
import time
from typing import Any

import torch

from . import _patch


@_patch("propose_draft_token_ids, execute_model", per_runner=True)
def proposer_timer(runner: Any) -> bool:
    """Item 6: wrap this runner's `propose_draft_token_ids` with counters and a clock, and count the request
    steps (requests scheduled, summed over steps) in `execute_model`; False when it already was.

    The request steps are what tokens per step divides by (vLLM's accepted-token counter also counts
    tokens that max_tokens cut). They are counted in `execute_model`, which runs every step, not in
    the drafter: vLLM skips the drafter in a step whose longest sequence + k exceeds max_model_len
    (`_input_fits_in_drafter`) and schedules k placeholder (zero) draft tokens for the next step
    instead, which its spec-decode counters count as a draft.
    """
    if hasattr(runner, "proposer_timer"):
        return False
    propose = runner.propose_draft_token_ids
    execute = runner.execute_model
    runner.proposer_timer = [0, 0.0, 0]
    # A GPU drafter returns before its kernels finish; wait for them so its time is counted, not deferred.
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)

    def counted(*args, **kwargs):
        scheduler_output = args[0] if args else kwargs["scheduler_output"]
        runner.proposer_timer[2] += len(scheduler_output.num_scheduled_tokens)
        return execute(*args, **kwargs)

    @functools.wraps(propose)
    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return propose(*args, **kwargs)
        finally:
            sync()
            runner.proposer_timer[0] += 1
            runner.proposer_timer[1] += time.perf_counter() - start

    runner.propose_draft_token_ids = timed
    runner.execute_model = counted
    return True


def read_proposer_timer(worker: Any) -> tuple[int, float, int]:
    """Runs in the worker: (drafter calls, seconds in them, request steps) counted by `proposer_timer`."""
    steps, seconds, request_steps = worker.model_runner.proposer_timer
    return steps, seconds, request_steps
