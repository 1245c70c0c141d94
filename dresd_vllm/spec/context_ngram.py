"""Context drafts without a compiled extension: n-gram hash chains over each request's tokens and earlier responses.

The fallback of :class:`~dresd_vllm.spec.context.ContextSource` where arctic-inference is not installed. The
latest earlier occurrences of the context's last tokens are read from n-gram hash chains
(:mod:`dresd_vllm.spec.ngram_index`), `LATEST` per chain, in two stores:

- the request's own tokens (prompt and output so far), read from the runner's token array;
- a global ring of the last ``cached_requests`` responses (at most `ngram_index.GLOBAL_TOKENS` tokens), to which a
  request's response is added when it leaves the batch.

The matches of both are pooled: the longest match length wins, and the draft follows the most frequent
continuation of the matches of that length, token by token, while its frequency (continuing matches /
all matches, arctic-inference's probability) stays at or above ``min_token_prob``, for at most
``max_spec_factor`` x the match length tokens. One vectorised pass scores the whole batch.

Unlike arctic-inference's suffix tree, a response joins the global store when it ends, not while it is
generated, and the draft after a long match is not shortened by the tree's depth.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from dresd_vllm.spec.context import ContextCandidates, ContextSource
from dresd_vllm.spec.ngram_index import RequestChains, ResponseRing

LATEST = 16
"""Earlier occurrences read per chain and store."""
PATHS = 16
"""Matches whose continuations are counted (the latest, own tokens first)."""


class NgramContext(ContextSource):
    """Context drafts from n-gram hash chains in NumPy (see the module docstring); no compiled extension."""

    def __init__(self, *args: Any, **kwargs: Any):  # ContextSource's parameters
        super().__init__(*args, **kwargs)
        self.requests: dict[object, RequestChains] = {}
        self.responses = ResponseRing(self.cached_requests) if self.cached_requests > 0 else None

    @property
    def active_requests(self) -> Collection[object]:
        return self.requests.keys()

    def candidates(
        self,
        req_ids: Sequence[object],
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens: np.ndarray,
        token_ids: np.ndarray,
        width: int,
    ) -> ContextCandidates:
        batch = len(req_ids)
        # A request that left the batch has finished (or was preempted): its response joins the global store.
        seen = set(req_ids)
        for req_id in [r for r in self.requests if r not in seen]:
            response = self.requests.pop(req_id).response
            if self.responses is not None and response:
                self.responses.add(response)
        own: list[list[int]] = [[] for _ in range(batch)]
        cached: list[list[int]] = [[] for _ in range(batch)]
        for i, (req_id, sampled) in enumerate(zip(req_ids, sampled_token_ids, strict=True)):
            if not sampled:
                continue
            n, row = int(num_tokens[i]), token_ids[i]
            request = self.requests.get(req_id)
            if request is None or request.end != n - len(sampled):  # new, or its tokens are not the ones indexed
                request = self.requests[req_id] = RequestChains(np.asarray(row[: n - len(sampled)]))
            request.append(row, sampled)
            if width > 0:
                own[i] = request.latest(row, LATEST)
                if self.responses is not None:
                    cached[i] = self.responses.latest(row, n - 1, LATEST)
        return self._draft(own, cached, np.asarray(num_tokens[:batch], dtype=np.int64), token_ids, width)

    def _draft(
        self, own: list[list[int]], cached: list[list[int]], num_tokens: np.ndarray, token_ids: np.ndarray, width: int
    ) -> ContextCandidates:
        """Match lengths and the most frequent continuation, for the whole batch at once."""
        batch, depth = len(own), self.max_depth
        tokens = np.full((batch, max(width, 0)), -1, dtype=np.int64)
        probs = np.zeros((batch, max(width, 0)), dtype=np.float32)
        match_len = np.zeros(batch, dtype=np.int64)
        if width <= 0 or (not any(own) and not any(cached)):
            return ContextCandidates(tokens, probs, match_len)
        rows = np.arange(batch)[:, None]
        last_column = token_ids.shape[1] - 1
        back = np.arange(depth)
        ahead = np.arange(1, width + 1)
        context_at = num_tokens[:, None] - 1 - back  # [B, depth]
        context = np.where(context_at >= 0, token_ids[rows, np.maximum(context_at, 0)], -3)

        # The request's own tokens, from the runner's token array.
        pos = _padded(own)
        ends = num_tokens[:, None, None]
        at = pos[:, :, None] - back
        valid = (pos >= 0)[:, :, None]
        own_back = np.where(valid & (at >= 0), token_ids[rows[:, :, None], np.maximum(at, 0)], -2)
        at = np.minimum(pos[:, :, None] + ahead, last_column)
        own_next = np.where(valid & (pos[:, :, None] + ahead < ends), token_ids[rows[:, :, None], at], -1)
        backs, nexts = [own_back], [own_next]
        if self.responses is not None and any(cached):
            store = self.responses
            pos = _padded(cached)
            valid = (pos >= 0)[:, :, None]
            at = pos[:, :, None] - back
            backs.append(np.where(valid & (at >= store.floor), store.tokens[at % store.capacity], -2))
            at = pos[:, :, None] + ahead
            nexts.append(np.where(valid & (at < store.end), store.tokens[at % store.capacity], -1))
        matched = np.concatenate(backs, axis=1) == context[:, None, :]
        lengths = np.cumprod(matched, axis=2).sum(axis=2)  # [B, C]: tokens matched by each earlier occurrence
        following = np.concatenate(nexts, axis=1)  # [B, C, width]: the tokens that followed it

        # The matches of the longest length, at most PATHS of them; the others' continuations are voided.
        longest = lengths.max(axis=1)
        keep = (lengths == longest[:, None]) & (longest[:, None] > 0)
        first = np.argsort(~keep, axis=1, kind="stable")[:, :PATHS]
        following = np.where(keep[rows, first][:, :, None], following[rows, first], -1)  # [B, P, width]
        total = np.maximum(keep.sum(axis=1), 1)
        # support[b, a, j]: the matches that continue as match a does up to depth j (0 once a has ended). The
        # most frequent path is the continuation of the match whose support is largest, depth after depth.
        agree = (following[:, :, None, :] == following[:, None, :, :]) & (following >= 0)[:, :, None, :]
        support = np.cumprod(agree, axis=3).sum(axis=2)
        order = np.arange(support.shape[1])
        keys = [-order + np.zeros_like(support[:, :, 0])] + [support[:, :, j] for j in range(width - 1, -1, -1)]
        best = np.lexsort(keys, axis=-1)[:, -1]
        index = np.arange(batch)
        path, prob = following[index, best], support[index, best] / total[:, None]
        limit = np.minimum(width, (longest * self.max_spec_factor + 1e-6).astype(np.int64))
        going = np.cumprod((path >= 0) & (prob >= self.min_token_prob) & (np.arange(width) < limit[:, None]), axis=1)
        tokens[:] = np.where(going, path, -1)
        probs[:] = np.where(going, prob, 0.0)
        match_len[:] = np.where(going[:, 0], longest, 0)
        return ContextCandidates(tokens, probs, match_len)


def _padded(lists: list[list[int]]) -> np.ndarray:
    """Lists of positions as one int64 array, -1 past each list's end."""
    out = np.full((len(lists), max(1, max(map(len, lists)))), -1, dtype=np.int64)
    for i, values in enumerate(lists):
        out[i, : len(values)] = values
    return out
