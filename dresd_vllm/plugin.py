"""vLLM `general_plugins` entry point: makes `"method": "dresd"` a speculative method.

vLLM calls `register()` in `EngineArgs.__post_init__` (before the speculative config is built),
in the engine core and in every worker, so the patches are in place wherever they are needed
(each logs one line; `DRESD_VLLM_PATCHES=0` turns them off, see `dresd_vllm.patches`).
"""

from . import patches


def register() -> None:
    """Apply dresd-vllm's patches to vLLM (idempotent; none with `DRESD_VLLM_PATCHES=0`); never raises.

    vLLM's plugin loader does not catch an exception from `register()`, so one would stop every engine in
    the environment, plain decoding included. What needs the patches refuses when it is asked for instead.
    """
    try:
        patches.apply()
    except Exception:
        patches.logger.exception("dresd-vllm: patching vLLM failed; DReSD and REST will refuse to start")
