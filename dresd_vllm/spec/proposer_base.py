"""What every dresd-vllm proposer shares: options from `additional_config`, a fault guard, step timing.

A fault inside a proposer never reaches vLLM: it is logged once and that step goes on without
drafts, so outputs cannot change and the server stays up. What a proposer hands back is checked
too: a draft that holds an id outside the vocabulary, or is longer than allowed, is such a fault
(the engine would index its embedding table with it).

`DRESD_VLLM_STRICT=1` turns the guard off: the fault is raised instead, so a bug shows where it
happens rather than as `faults > 0` later. The test suite sets it, except where it tests the guard.
"""

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from vllm import envs
from vllm.config import ModelConfig, SpeculativeConfig, VllmConfig
from vllm.logger import init_logger

from dresd_vllm.store.manifest import tokenizer_fingerprint


def proposer_logger(name: str) -> logging.Logger:
    """A logger under vLLM's "vllm" logger, so its lines appear where vLLM's own do (server log included).

    vLLM configures only the "vllm" logger tree; a logger outside it shows nothing at INFO.
    """
    return init_logger(f"vllm.{name}")


logger = proposer_logger(__name__)

STRICT_ENV = "DRESD_VLLM_STRICT"


def strict() -> bool:
    """Whether `DRESD_VLLM_STRICT` is set to a true value: proposer faults are raised, not survived."""
    return os.environ.get(STRICT_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def model_tokenizer_fingerprint(model_config: ModelConfig) -> str | None:
    """The served tokenizer's fingerprint (None when vLLM runs without a tokenizer)."""
    if model_config.skip_tokenizer_init:
        return None
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    return tokenizer_fingerprint(cached_tokenizer_from_config(model_config))


def output_rank() -> bool:
    """Whether this worker's drafts are the ones vLLM schedules: tensor-parallel rank 0's.

    The executor takes the drafts from its output rank (`take_draft_token_ids`) and every rank's forward
    pass reads them from the scheduler's output, so the other ranks need no datastore and draft nothing.
    """
    from vllm.distributed import get_tensor_model_parallel_rank

    try:
        return get_tensor_model_parallel_rank() == 0
    except AssertionError:  # no parallel groups (a runner built outside a worker)
        return True


class GuardedProposer:
    """Base of the custom_class proposers; subclasses implement `_draft` and may extend `stats`."""

    method: str  # the speculative-config method, also the key of its options in additional_config

    def __init__(self, vllm_config: VllmConfig):
        additional = vllm_config.additional_config
        options = additional.get(self.method) if isinstance(additional, dict) else None
        if not isinstance(options, dict):
            raise ValueError(
                f"{type(self).__name__} needs its options in additional_config[{self.method!r}], "
                f'or use --speculative-config \'{{"method": "{self.method}", "datastore": ...}}\''
            )
        assert vllm_config.speculative_config is not None  # vLLM builds proposers for speculative configs only
        self.options = options
        self.speculative_config: SpeculativeConfig = vllm_config.speculative_config
        self.k = self.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.output_rank = output_rank()
        if not self.output_rank:
            logger.info("%s: not the output rank, whose drafts vLLM schedules; no datastore, no drafts here",
                        type(self).__name__)  # fmt: skip
        self._faulted = False
        self._strict = strict()
        self._counters: dict[str, float] = dict(
            steps=0, requests=0, draft_tokens=0, faults=0, propose_s=0.0, step_s=0.0
        )
        self._last_propose_end: float | None = None
        self._last_log = time.monotonic()

    def load_model(self, model: torch.nn.Module) -> None:
        """vLLM hands every drafter the target model; retrieval needs none."""

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """One draft per request of the batch (`[]` for none), never longer than num_speculative_tokens."""
        start = time.perf_counter()
        batch = len(sampled_token_ids)
        drafts: list[list[int]] = [[] for _ in range(batch)]
        if batch and self.output_rank:
            try:
                num_tokens = np.asarray(num_tokens_no_spec[:batch])
                max_len = np.clip(np.minimum(self.k, self.max_model_len - num_tokens - 1), 0, None)
                drafts = self._checked(self._draft(sampled_token_ids, num_tokens, token_ids_cpu, max_len), max_len)
                self._counters["requests"] += batch
                self._counters["draft_tokens"] += sum(map(len, drafts))
            except Exception:
                if self._strict:
                    raise
                self._counters["faults"] += 1
                if not self._faulted:
                    self._faulted = True
                    logger.exception("%s failed; steps with a fault go on without drafts", type(self).__name__)
        self._count_step(start, time.perf_counter())
        return drafts

    def _checked(self, drafts: list[list[int]], max_len: np.ndarray) -> list[list[int]]:
        if len(drafts) != len(max_len):
            raise RuntimeError(f"{len(drafts)} drafts for a batch of {len(max_len)} requests")
        for draft, limit in zip(drafts, max_len, strict=True):
            if len(draft) > limit or (draft and (min(draft) < 0 or max(draft) >= self.vocab_size)):
                raise ValueError(
                    f"draft {list(draft)} holds an id outside [0, vocab_size={self.vocab_size}) "
                    f"or is longer than the {limit} tokens allowed"
                )
        return drafts

    def _draft(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens: np.ndarray,
        token_ids_cpu: np.ndarray,
        max_len: np.ndarray,
    ) -> list[list[int]]:
        """The batch's drafts, each at most `max_len` tokens; called on the output rank only."""
        raise NotImplementedError

    def _count_step(self, start: float, end: float) -> None:
        counters = self._counters
        counters["steps"] += 1
        counters["propose_s"] += end - start
        # A gap of over a second is the engine idling between requests, not a step.
        if self._last_propose_end is not None and end - self._last_propose_end < 1.0:
            counters["step_s"] += end - self._last_propose_end
        self._last_propose_end = end
        if end - self._last_log >= envs.VLLM_LOG_STATS_INTERVAL:
            self._last_log = end
            stats = self.stats()
            logger.info(
                "%s: %d steps, %.3f ms/step proposing (%.1f%% of step time), %.2f draft tokens/request, %d faults",
                type(self).__name__, stats["steps"], stats["propose_ms_per_step"], 100 * stats["propose_share"],
                stats["draft_tokens_per_request"], stats["faults"],
            )  # fmt: skip

    def stats(self) -> dict[str, float]:
        """Cumulative counters and per-step averages; `LLM.collective_rpc("dresd_stats")` returns them."""
        counters = dict(self._counters)
        steps = max(counters["steps"], 1)
        return {
            **counters,
            "propose_ms_per_step": 1e3 * counters["propose_s"] / steps,
            "propose_share": counters["propose_s"] / counters["step_s"] if counters["step_s"] else 0.0,
            "draft_tokens_per_request": counters["draft_tokens"] / max(counters["requests"], 1),
        }
