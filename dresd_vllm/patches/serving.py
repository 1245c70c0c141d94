"""The serving patches of `dresd_vllm.patches`: the method keys, the hidden-state capture, the stats RPC."""

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import _patch, logger, unsupported

if TYPE_CHECKING:
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata


@_patch("EngineArgs.create_speculative_config")
def speculative_methods() -> None:
    """The method keys patch: `"method": "dresd" | "rest"` (refused on an unsupported vLLM)."""
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs.create_speculative_config = _rewrite_dresd_method(EngineArgs.create_speculative_config)


@_patch("GPUModelRunner.propose_draft_token_ids")
def capture_hidden_states() -> None:
    """The hidden-state capture: the verified hidden states reach the drafter."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    GPUModelRunner.propose_draft_token_ids = _capture_hidden_states(GPUModelRunner.propose_draft_token_ids)


@_patch("WorkerBase.dresd_stats")
def worker_stats() -> None:
    """The stats RPC: `collective_rpc("dresd_stats")`."""
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.dresd_stats = _worker_dresd_stats


def _rewrite_dresd_method(create_speculative_config):
    from dresd_vllm.config import METHODS, split_speculative_config

    @functools.wraps(create_speculative_config)
    def wrapper(self, *args, **kwargs):
        spec = self.speculative_config
        if isinstance(spec, dict) and spec.get("method") in METHODS:
            problem = unsupported()
            if problem is not None:
                raise RuntimeError(problem)
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
                capture(sample_hidden_states, spec_decode_metadata, self.input_batch.req_ids[: len(sampled_token_ids)])
            except Exception:
                from dresd_vllm.spec.proposer_base import strict

                if strict():
                    raise
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


def _worker_dresd_stats(worker) -> dict | None:
    stats = getattr(getattr(worker.model_runner, "drafter", None), "stats", None)
    return stats() if callable(stats) else None
