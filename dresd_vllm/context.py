"""Context drafting: continue each request from its own tokens (and earlier responses) with a suffix tree.

The tree is arctic-inference's (SuffixDecoding, the same structure behind vLLM's `suffix` method): one
tree per active request over its prompt and output so far, and one global tree over the last
``cached_requests`` responses. A draft follows the most frequent continuation of the longest match
of the context's suffix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class ContextCandidates:
    """One chain per request from the suffix tree."""

    tokens: np.ndarray  # int64 [B, W], -1 past the chain's end
    probs: np.ndarray  # float32 [B, W]: the tree's frequency of the path up to depth j (0 past the end)
    match_len: np.ndarray  # int64 [B]: context tokens matched (0: no draft)


class ContextSource:
    """Suffix-tree drafts over each request's own tokens; requests are tracked by the runner's request ids."""

    def __init__(
        self,
        max_depth: int = 24,
        cached_requests: int = 10000,
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
    ):
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.cache = SuffixDecodingCache(max_tree_depth=max_depth, max_cached_requests=cached_requests)
        self.max_depth = max_depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob

    def candidates(
        self,
        req_ids: Sequence[object],
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens: np.ndarray,
        token_ids: np.ndarray,
        width: int,
    ) -> ContextCandidates:
        """Record this step's tokens and draft up to ``width`` tokens for every request.

        ``token_ids[i, :num_tokens[i]]`` is request i's prompt and output, ending in its
        ``sampled_token_ids[i]``; an empty entry (a partial prefill) gets no draft.
        """
        cache, batch = self.cache, len(req_ids)
        tokens = np.full((batch, width), -1, dtype=np.int64)
        probs = np.zeros((batch, width), dtype=np.float32)
        match_len = np.zeros(batch, dtype=np.int64)
        for i, (req_id, sampled) in enumerate(zip(req_ids, sampled_token_ids, strict=True)):
            if not sampled:
                continue
            n = int(num_tokens[i])
            if req_id not in cache.active_requests:
                if req_id in cache.cached_requests:
                    cache.evict_cached_response(req_id)
                cache.start_request(req_id, np.ascontiguousarray(token_ids[i, : n - len(sampled)], dtype=np.int32))
            cache.add_active_response(req_id, list(sampled))
            if width <= 0:
                continue
            pattern = np.ascontiguousarray(token_ids[i, max(0, n - self.max_depth) : n], dtype=np.int32)
            draft = cache.speculate(
                req_id,
                pattern,
                max_spec_tokens=width,
                max_spec_factor=self.max_spec_factor,
                min_token_prob=self.min_token_prob,
            )
            length = len(draft.token_ids)
            if length:
                tokens[i, :length] = draft.token_ids
                probs[i, :length] = draft.probs
                match_len[i] = draft.match_len
        seen = set(req_ids)
        for req_id in [r for r in cache.active_requests if r not in seen]:
            cache.stop_request(req_id)
        return ContextCandidates(tokens, probs, match_len)
