"""REST's drafts for a batch: the one implementation the served proposer and the replay benchmark share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dresd_vllm.config import RestConfig
from dresd_vllm.rest.suffix_array import SEPARATOR, SuffixArrayStore
from dresd_vllm.store.manifest import DatastoreError


class RestDrafter:
    """Drafts by exact suffix match of each request's context in a corpus suffix array (REST, He et al. 2024)."""

    def __init__(self, config: RestConfig):
        self.config = config
        self.store = SuffixArrayStore(config.datastore)

    def check_model(self, tokenizer_fingerprint: str | None, vocab_size: int) -> None:
        """Raise :class:`DatastoreError` if the corpus was tokenized by another tokenizer than the served one."""
        expected = self.store.header.get("tokenizer_fingerprint")
        if expected is not None and tokenizer_fingerprint is not None and expected != tokenizer_fingerprint:
            raise DatastoreError(
                f"{self.config.datastore}: 'tokenizer_fingerprint' is {expected}, but the served model's tokenizer "
                f"is {tokenizer_fingerprint}; build the REST datastore with this model's tokenizer"
            )
        tokens = self.store.tokens
        low, high = (int(tokens.min()), int(tokens.max())) if len(tokens) else (0, 0)
        if low < SEPARATOR or high >= vocab_size:
            raise DatastoreError(
                f"{self.config.datastore}: holds token id {low if low < SEPARATOR else high}, outside the served "
                f"model's vocabulary [0, {vocab_size}); build the REST datastore with this model's tokenizer"
            )

    def step(
        self,
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens: np.ndarray,
        token_ids: np.ndarray,
        max_len: np.ndarray,
    ) -> list[list[int]]:
        """One draft of at most ``max_len[i]`` tokens per request; ``token_ids[i, :num_tokens[i]]`` its context.

        A request that sampled nothing this step (a partial prefill) or has no room left gets none.
        """
        config = self.config
        drafts: list[list[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens[i])
            if not sampled or max_len[i] <= 0:
                drafts.append([])
                continue
            context = token_ids[i, max(0, n - config.max_span) : n]
            drafts.append(
                self.store.draft(
                    context, int(max_len[i]), config.max_span, config.min_span, config.max_matches, config.min_support
                )
            )
        return drafts
