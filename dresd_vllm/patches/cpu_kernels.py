"""The CPU kernel fix of `dresd_vllm.patches`: the CPU platform's Triton fallbacks, registered once and with a working
`expand_kernel`."""

import functools

import torch

from . import _patch

_EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


@_patch("CpuPlatform.register_triton_kernel_overrides, cpu_triton_utils._expand_kernel_impl")
def cpu_kernel_overrides() -> bool:
    """Registered once per process, with a working `expand_kernel`; False (nothing to do) off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.platforms.cpu import CpuPlatform

    register = CpuPlatform.register_triton_kernel_overrides.__func__
    # typeshed's lru_cache wrapper takes *args: Hashable, which classmethod's (cls, ...) signature refuses.
    CpuPlatform.register_triton_kernel_overrides = classmethod(functools.cache(_fix_cpu_expand(register)))  # type: ignore[arg-type]
    _fix_registered_cpu_expand()
    return True


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
    """Swap in `expand_kernel` before the CPU platform registers its Triton fallbacks (see `dresd_vllm.patches`)."""

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
