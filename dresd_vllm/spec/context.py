"""Context drafting: continue each request from its own tokens and from earlier responses.

`ContextSource(...)` gives one of two implementations with the same interface:

- :class:`SuffixTreeContext`, where arctic-inference is installed: its suffix trees (SuffixDecoding, the
  structure behind vLLM's `suffix` method), one per active request over its prompt and output so far,
  and one global tree over the last ``cached_requests`` responses. Compiled, the faster one.
- :class:`~dresd_vllm.spec.context_ngram.NgramContext` otherwise: n-gram hash chains in NumPy and Python,
  what `pip install "dresd-vllm[gpu]"` (or `[cpu]`) runs, since arctic-inference is a source distribution
  that those installs do not build. It logs one line saying so.

Either way a draft follows the most frequent continuation of a match of the context's suffix, with the
frequency of its path as each position's feature.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from dresd_vllm.spec.proposer_base import proposer_logger

logger = proposer_logger(__name__)


@dataclasses.dataclass
class ContextCandidates:
    """One chain per request from the request's context."""

    tokens: np.ndarray  # int64 [B, W], -1 past the chain's end
    probs: np.ndarray  # float32 [B, W]: the frequency of the path up to depth j among the matches (0 past the end)
    match_len: np.ndarray  # int64 [B]: context tokens matched (0: no draft)


class ContextSource:
    """Context drafts over each request's own tokens and earlier responses; requests are tracked by their ids.

    Calling `ContextSource(...)` builds a :class:`SuffixTreeContext` where arctic-inference can be imported
    and an :class:`~dresd_vllm.spec.context_ngram.NgramContext` otherwise.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> ContextSource:
        if cls is ContextSource:
            if suffix_tree_available():
                cls = SuffixTreeContext
            else:
                from dresd_vllm.spec.context_ngram import NgramContext

                _log_fallback()
                cls = NgramContext
        return super().__new__(cls)

    def __init__(
        self,
        max_depth: int = 24,
        cached_requests: int = 10000,
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
    ):
        self.max_depth = max_depth
        self.cached_requests = cached_requests
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob

    @property
    def active_requests(self) -> Collection[object]:
        """The requests whose context is held (those of the last batch)."""
        raise NotImplementedError

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
        ``sampled_token_ids[i]``; an empty entry (a partial prefill) gets no draft. A request absent
        from the batch has finished (or was preempted): its response joins the global cache.
        """
        raise NotImplementedError


@functools.cache
def suffix_tree_available() -> bool:
    """Whether arctic-inference's suffix tree can be imported."""
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _log_fallback() -> None:
    logger.info(
        "dresd-vllm: arctic_inference is not installed, so context drafts come from dresd-vllm's NumPy n-gram "
        "index; for the faster compiled suffix tree build arctic-inference (docs/install.md)"
    )


class SuffixTreeContext(ContextSource):
    """arctic-inference's suffix trees: one per active request, one global over the last responses."""

    def __init__(self, *args: Any, **kwargs: Any):  # ContextSource's parameters
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        super().__init__(*args, **kwargs)
        self.cache = SuffixDecodingCache(max_tree_depth=self.max_depth, max_cached_requests=self.cached_requests)

    @property
    def active_requests(self) -> Collection[object]:
        return self.cache.active_requests

    def candidates(
        self,
        req_ids: Sequence[object],
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens: np.ndarray,
        token_ids: np.ndarray,
        width: int,
    ) -> ContextCandidates:
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
