"""The DReSD proposer for vLLM's custom_class speculative hook.

vLLM builds one `DresdProposer(vllm_config)` per worker. Every step the patched runner hands it the
states of the sampled positions and the batch's request ids (`capture_hidden_states`), then calls
`propose`, which picks each request's verified states and drafts for the whole batch through one
:class:`Drafter` step.
"""

import dataclasses
import time
from typing import Any, cast

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

from dresd_vllm import patches
from dresd_vllm.config import DresdConfig
from dresd_vllm.index.search import SearchOptions
from dresd_vllm.spec.drafting import Drafter
from dresd_vllm.spec.proposer_base import GuardedProposer, model_tokenizer_fingerprint, proposer_logger
from dresd_vllm.store.datastore import Datastore

logger = proposer_logger(__name__)


class DresdProposer(GuardedProposer):
    """Drafts by dense retrieval of the target model's own hidden states, and from each request's context."""

    method = "dresd"

    def __init__(self, vllm_config: VllmConfig):
        # Built in the runner's __init__, before its first step: the plugin-free custom_class form gets the
        # hidden-state capture here.
        patches.require(self.method, "capture_hidden_states")
        super().__init__(vllm_config)
        self.config = DresdConfig.from_dict(self.options)
        if not self.output_rank:  # vLLM schedules the drafts of tensor-parallel rank 0 alone
            return
        model_config = vllm_config.model_config
        self.datastore = Datastore.load(
            self.config.datastore, SearchOptions.of(self.config, device=vllm_config.device_config.device)
        )
        self.datastore.check_model(
            hidden_size=model_config.get_hidden_size(),
            vocab_size=model_config.get_vocab_size(),
            tokenizer_fingerprint=model_tokenizer_fingerprint(model_config),
        )
        # ModelConfig's dtype is typed as what the user may pass ("auto", ...); once made it is a torch.dtype.
        warn_dtype(self.datastore.manifest.dtype, cast(torch.dtype, model_config.dtype), self.config.datastore)
        # The index's device: vLLM's, or the CPU where vLLM leaves it unset (TPU).
        self.drafter = Drafter(
            self.datastore,
            self.config,
            device=self.datastore.index.device,
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        )
        self.retriever = self.drafter.retriever
        # vLLM's batch-size schedule for num_speculative_tokens, applied here so no draft is made to be cut.
        schedule = self.speculative_config.num_speculative_tokens_per_batch_size
        max_batch = vllm_config.scheduler_config.max_num_seqs
        self._k_by_batch = (
            np.asarray(build_dynamic_sd_schedule_lookup(schedule, max_batch, self.k))
            if schedule
            else np.full(max_batch + 1, self.k)
        )
        self._captured: tuple[torch.Tensor, Any] | None = None
        self._req_ids: list[str] = []
        logger.info(
            "DReSD: %d keys from %s, top_k=%d, merge=%s, k=%d, context=%s, online_store=%s, length_control=%s",
            self.datastore.manifest.num_keys, self.config.datastore, self.config.top_k, self.config.merge, self.k,
            self.config.context, self.config.online_store, self.config.length_control,
        )  # fmt: skip
        if self.config.online_store_path is not None:
            logger.info(
                "DReSD: online store spool %s: %d keys reloaded, appending", self.config.online_store_path,
                self.drafter.stats.reloaded_keys,
            )  # fmt: skip

    def capture_hidden_states(
        self, sample_hidden_states: torch.Tensor, spec_decode_metadata: Any, req_ids: list[str]
    ) -> None:
        """Called by the patched runner before `propose`: the states of this step's sampled positions. The
        verified ones are picked in `_draft`, so ranks other than the output rank do no work for them."""
        self._captured, self._req_ids = (sample_hidden_states, spec_decode_metadata), list(req_ids)

    def _draft(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens: np.ndarray,
        token_ids_cpu: np.ndarray,
        max_len: np.ndarray,
    ) -> list[list[int]]:
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("no hidden states were captured for this step; is dresd_vllm.patches applied?")
        if len(self._req_ids) != len(sampled_token_ids):
            raise RuntimeError(f"captured {len(self._req_ids)} request ids for {len(sampled_token_ids)} requests")
        verified = patches.verified_states(captured[0], sampled_token_ids, captured[1])
        batch = len(sampled_token_ids)
        max_len = np.minimum(max_len, self._k_by_batch[min(batch, len(self._k_by_batch) - 1)])
        return self.drafter.step(
            self._req_ids, sampled_token_ids, num_tokens, token_ids_cpu, verified, max_len, now=time.perf_counter()
        )

    def stats(self) -> dict[str, float]:
        """The base counters plus the retriever's stage times and filter counts and the drafter's choices."""
        stats = super().stats()
        if not self.output_rank:
            return stats
        steps = max(stats["steps"], 1)
        # The base counters keep their names (steps, requests); each stage time also comes per step.
        parts = {**dataclasses.asdict(self.retriever.stats), **dataclasses.asdict(self.drafter.stats)}
        for name, value in parts.items():
            stats.setdefault(name, value)
            if name.endswith("_s"):
                stats[f"{name[:-2]}_ms_per_step"] = 1e3 * value / steps
        for batch, price in self.drafter.price_table().items():
            stats[f"token_price_b{batch}"] = price
        if self.drafter.spool is not None:  # the writer thread's counters: keys on disk, dropped, failed writes
            spool = self.drafter.spool
            stats.update(spool_written_keys=spool.written_rows, spool_dropped_keys=spool.dropped_rows)
            stats["spool_errors"] = spool.errors
        return stats


def warn_dtype(built: str | None, served: torch.dtype, datastore: str) -> bool:
    """Warn (and return True) when the datastore's keys were embedded at another dtype than the one served.

    Still lossless, but the served states are not the ones the keys were made from, and an ID corpus
    generated at another dtype is not this model's greedy output: drafts are accepted less often.
    """
    served_name = str(served).removeprefix("torch.")
    if built is None or built == served_name:
        return False
    logger.warning(
        "DReSD: %s was built at dtype %s but the model is served at %s; serve with --dtype %s, or rebuild with "
        "dresd-build --dtype %s (acceptance suffers, outputs do not)",
        datastore, built, served_name, built, served_name,
    )  # fmt: skip
    return True
