"""The DReSD proposer for vLLM's custom_class speculative hook.

vLLM builds one `DresdProposer(vllm_config)` per worker. Every step the patched runner hands it the
hidden state that produced each request's last sampled token (`capture_hidden_states`), then calls
`propose`, which drafts for the whole batch in one retriever call.
"""

import dataclasses

import faiss
import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger

from . import patches
from .config import DresdConfig
from .datastore import Datastore, tokenizer_fingerprint
from .proposer_base import GuardedProposer
from .retriever import Retriever

logger = init_logger(__name__)

patches.apply()  # the plugin-free custom_class form still needs the hidden-state capture


class DresdProposer(GuardedProposer):
    """Drafts by dense retrieval of the target model's own last-layer hidden states."""

    method = "dresd"

    def __init__(self, vllm_config: VllmConfig):
        super().__init__(vllm_config)
        self.config = DresdConfig.from_dict(self.options)
        model_config = vllm_config.model_config
        self.datastore = Datastore.load(
            self.config.datastore,
            backend=self.config.backend,
            device=vllm_config.device_config.device,
            nprobe=self.config.nprobe,
            ef_search=self.config.ef_search,
        )
        self.datastore.check_model(
            hidden_size=model_config.get_hidden_size(),
            vocab_size=model_config.get_vocab_size(),
            tokenizer_fingerprint=model_tokenizer_fingerprint(model_config),
        )
        self.retriever = Retriever(
            self.datastore,
            top_k=self.config.top_k,
            merge=self.config.merge,
            min_support=self.config.min_support,
            max_candidates=self.config.max_candidates,
            search_threads=self.config.search_threads,
        )
        self._hidden: torch.Tensor | None = None
        self._omp_threads = faiss.omp_get_max_threads()
        logger.info(
            "DReSD: %d keys from %s, top_k=%d, merge=%s, k=%d",
            self.datastore.manifest.num_keys, self.config.datastore, self.config.top_k, self.config.merge, self.k,
        )  # fmt: skip

    def capture_hidden_states(self, hidden: torch.Tensor) -> None:
        """Called by the patched runner with one row per request, in batch order."""
        self._hidden = hidden

    def _draft(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens: np.ndarray,
        token_ids_cpu: np.ndarray,
        max_len: np.ndarray,
    ) -> list[list[int]]:
        # The setting this step's forward pass ran with: a proposer that leaked FAISS's would show it here.
        self._omp_threads = min(self._omp_threads, faiss.omp_get_max_threads())
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("no hidden states were captured for this step; is dresd_vllm.patches applied?")
        if hidden.shape[0] != len(sampled_token_ids):
            raise RuntimeError(f"captured {hidden.shape[0]} hidden states for {len(sampled_token_ids)} requests")
        # -1 never matches a stored token: partial prefills (no token sampled) get no draft.
        last_tokens = np.fromiter((t[-1] if t else -1 for t in sampled_token_ids), np.int64, len(sampled_token_ids))
        return self.retriever.draft(hidden, last_tokens, max_len)

    def stats(self) -> dict[str, float]:
        """The base counters plus the retriever's stage times and filter counts."""
        stats = super().stats()
        retriever = dataclasses.asdict(self.retriever.stats)
        steps = max(stats["steps"], 1)
        for stage in ("projection", "search", "merge"):
            stats[f"{stage}_s"] = retriever[f"{stage}_s"]
            stats[f"{stage}_ms_per_step"] = 1e3 * retriever[f"{stage}_s"] / steps
        stats["hits"], stats["survivors"] = retriever["hits"], retriever["survivors"]
        stats["omp_threads_min"] = self._omp_threads
        return stats


def model_tokenizer_fingerprint(model_config) -> str | None:
    """The served tokenizer's fingerprint (None when vLLM runs without a tokenizer)."""
    if model_config.skip_tokenizer_init:
        return None
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    return tokenizer_fingerprint(cached_tokenizer_from_config(model_config))
