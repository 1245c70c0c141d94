"""The vLLM engine of the target model, as the build and the benchmarks start it.

One factory for every engine the tools run: generation (`dresd-build generate`), token states
(`EmbedWorker`, the datastore build and `dresd-build eval`) and the replay benchmark, so they all get
the same seed, context length and CPU KV cache size.
"""

import os
from typing import Any

CPU_KV_CACHE_BYTES = 1 << 30


def make_llm(model: str, max_length: int, engine_args: dict[str, Any], pooling: bool) -> Any:
    """A `vllm.LLM` for `model` with context `max_length`; `pooling` makes it return token states."""
    from vllm import LLM
    from vllm.config import PoolerConfig
    from vllm.platforms import current_platform

    kwargs: dict[str, Any] = {"seed": 0, **engine_args, "model": model, "max_model_len": max_length}
    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # Without a KV cache size vLLM-CPU reserves gpu_memory_utilization (0.92) of the host's RAM and
        # refuses to start on any machine doing other work; a build needs only a small cache.
        kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    if pooling:
        kwargs["runner"] = "pooling"
        kwargs["pooler_config"] = PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False)
    return LLM(**kwargs)


def close_llm(llm: Any) -> None:
    """Shut an engine down now, so a long CLI run or a test does not hold two at once."""
    llm.llm_engine.engine_core.shutdown()
