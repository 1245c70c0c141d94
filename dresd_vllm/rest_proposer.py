"""REST as a vLLM speculative method: `{"method": "rest", "datastore": FILE, ...}`.

Drafts from the longest suffix of each request's context that occurs in a corpus suffix array
(`dresd-build rest`), the same corpus DReSD's datastore is built from, for a side-by-side baseline.
"""

import numpy as np
from vllm.config import VllmConfig

from . import patches
from .config import RestConfig
from .manifest import DatastoreError
from .proposer_base import GuardedProposer, model_tokenizer_fingerprint
from .suffix_array import SEPARATOR, SuffixArrayStore


class RestProposer(GuardedProposer):
    """Drafts by exact suffix match of the context in a corpus (REST, He et al. 2024)."""

    method = "rest"

    def __init__(self, vllm_config: VllmConfig):
        # The plugin-free custom_class form gets the CPU sampler fix and dresd_stats here (none is required).
        patches.apply()
        super().__init__(vllm_config)
        self.config = RestConfig.from_dict(self.options)
        self.store = SuffixArrayStore(self.config.datastore)
        expected = self.store.header.get("tokenizer_fingerprint")
        served = model_tokenizer_fingerprint(vllm_config.model_config)
        if expected is not None and served is not None and expected != served:
            raise DatastoreError(
                f"{self.config.datastore}: 'tokenizer_fingerprint' is {expected}, but the served model's tokenizer "
                f"is {served}; build the REST datastore with this model's tokenizer"
            )
        low, high = (int(self.store.tokens.min()), int(self.store.tokens.max())) if len(self.store.tokens) else (0, 0)
        if low < SEPARATOR or high >= self.vocab_size:
            raise DatastoreError(
                f"{self.config.datastore}: holds token id {low if low < SEPARATOR else high}, outside the served "
                f"model's vocabulary [0, {self.vocab_size}); build the REST datastore with this model's tokenizer"
            )

    def _draft(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens: np.ndarray,
        token_ids_cpu: np.ndarray,
        max_len: np.ndarray,
    ) -> list[list[int]]:
        config = self.config
        drafts: list[list[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens[i])
            if not sampled or max_len[i] <= 0:  # partial prefill, or no room left
                drafts.append([])
                continue
            context = token_ids_cpu[i, max(0, n - config.max_span) : n]
            drafts.append(
                self.store.draft(
                    context, int(max_len[i]), config.max_span, config.min_span, config.max_matches, config.min_support
                )
            )
        return drafts
