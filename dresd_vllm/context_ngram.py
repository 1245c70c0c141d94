"""Context drafts without a compiled extension: n-gram hash chains over each request's tokens and earlier responses.

The fallback of :class:`~dresd_vllm.context.ContextSource` where arctic-inference is not installed. For
each n-gram order in `ORDERS` a hash chain links every position to the previous one that ends in the
same n-gram (zlib's match finder), so the latest earlier occurrences of the context's last tokens are
read in O(`LATEST`), however long the request, and a new token is linked in O(1). Two stores are searched:

- the request's own tokens (prompt and output so far), read from the runner's token array;
- a global ring of the last ``cached_requests`` responses (at most `GLOBAL_TOKENS` tokens), to which a
  request's response is added when it leaves the batch.

The matches of both are pooled: the longest match length wins, and the draft follows the most frequent
continuation of the matches of that length, token by token, while its frequency (continuing matches /
all matches, arctic-inference's probability) stays at or above ``min_token_prob``, for at most
``max_spec_factor`` x the match length tokens. One vectorised pass scores the whole batch.

Unlike arctic-inference's suffix tree, a response joins the global store when it ends, not while it is
generated, and the draft after a long match is not shortened by the tree's depth.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence

import numpy as np

from .context import ContextCandidates, ContextSource

ORDERS = (1, 4)
"""n-gram lengths with a hash chain: order 1 finds the recent matches of any length, order 4 the long ones further
back."""
LATEST = 16
"""Earlier occurrences read per chain and store."""
PATHS = 16
"""Matches whose continuations are counted (the latest, own tokens first)."""
GLOBAL_TOKENS = 1 << 20
"""Tokens the global store of earlier responses holds at most."""
_MULT = (1, 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)  # odd 64-bit constants, one per n-gram slot
_FIB = 0x9E3779B97F4A7C15  # Fibonacci hashing: the top bits of key * _FIB pick the global store's bucket
_M64 = (1 << 64) - 1


def ngram_keys(tokens: np.ndarray, order: int) -> np.ndarray:
    """uint64 key of the n-gram of ``order`` tokens ending at each position from ``order - 1`` on."""
    t = np.asarray(tokens).astype(np.uint64)
    n = len(t) - order + 1
    if n <= 0:
        return np.empty(0, np.uint64)
    keys = t[order - 1 :].copy()
    for j in range(1, order):
        keys += t[order - 1 - j : order - 1 - j + n] * np.uint64(_MULT[j])
    return keys


def ngram_key(tokens: Sequence[int] | np.ndarray, end: int, order: int) -> int:
    """`ngram_keys`'s key of the n-gram ending at ``tokens[end]``, in Python integers."""
    key = int(tokens[end])
    for j in range(1, order):
        key = (key + int(tokens[end - j]) * _MULT[j]) & _M64
    return key


def _link(keys: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each position's previous position with the same key in this block (-1: none), and per distinct key its
    last position: (prev, keys, last positions)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_pos = keys[order], positions[order]
    same = np.zeros(len(keys), dtype=bool)
    same[1:] = sorted_keys[1:] == sorted_keys[:-1]
    prev = np.full(len(keys), -1, dtype=np.int64)
    prev[order[same]] = sorted_pos[np.flatnonzero(same) - 1]
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = ~same[1:]
    return prev, sorted_keys[last], sorted_pos[last]


class _Request:
    """One active request: hash chains over its tokens (by absolute position) and its response so far."""

    __slots__ = ("heads", "prevs", "response", "end")

    def __init__(self, prompt: np.ndarray):
        self.heads: list[dict[int, int]] = []
        self.prevs: list[list[int]] = []
        for order in ORDERS:
            keys = ngram_keys(prompt, order)
            prev, last_keys, last_pos = _link(keys, np.arange(order - 1, len(prompt)))
            self.prevs.append([-1] * min(order - 1, len(prompt)) + prev.tolist())
            self.heads.append(dict(zip(last_keys.tolist(), last_pos.tolist(), strict=True)))
        self.response: list[int] = []
        self.end = len(prompt)

    def append(self, row: np.ndarray, sampled: Sequence[int]) -> None:
        """Link this step's tokens, which end at ``row[self.end + len(sampled) - 1]``."""
        self.response.extend(sampled)
        for pos in range(self.end, self.end + len(sampled)):
            for order, head, prev in zip(ORDERS, self.heads, self.prevs, strict=True):
                if pos < order - 1:
                    prev.append(-1)
                    continue
                key = ngram_key(row, pos, order)
                prev.append(head.get(key, -1))
                head[key] = pos
        self.end += len(sampled)

    def latest(self, row: np.ndarray, limit: int) -> list[int]:
        """The latest earlier positions (before the last) that end in the same n-gram as the last, per order."""
        last = self.end - 1
        found: dict[int, None] = {}
        for order, head, prev in zip(ORDERS, self.heads, self.prevs, strict=True):
            if last < order - 1:
                continue
            pos, taken = head.get(ngram_key(row, last, order), -1), 0
            if pos == last:
                pos = prev[pos]
            while pos >= 0 and taken < limit:
                found[pos] = None
                taken += 1
                pos = prev[pos]
        return list(found)


class _Responses:
    """The global store: the last responses in a ring of tokens, -1 between two, with bucketed hash chains."""

    def __init__(self, max_responses: int, capacity: int = GLOBAL_TOKENS):
        self.capacity = capacity
        self.bits = max(1, (capacity - 1).bit_length())
        self.max_responses = max_responses
        self.tokens = np.full(capacity, -1, dtype=np.int32)
        # A head holds position + 1 (0: empty), so the tables start as lazily zeroed memory.
        self.heads = [np.zeros(1 << self.bits, dtype=np.int64) for _ in ORDERS]
        self.prevs = [np.zeros(capacity, dtype=np.int64) for _ in ORDERS]
        self.starts: deque[int] = deque()
        self.end = 0  # tokens written so far
        self.floor = 0  # the oldest position still held

    def _buckets(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * np.uint64(_FIB)) >> np.uint64(64 - self.bits)).astype(np.int64)

    def add(self, response: Sequence[int]) -> None:
        """Store one finished response (its last `capacity - 1` tokens), evicting the oldest."""
        tokens = np.asarray(response, dtype=np.int64)[-(self.capacity - 1) :]
        start, size = self.end, len(tokens) + 1  # + the separator
        positions = np.arange(start, start + size)
        self.tokens[positions % self.capacity] = np.append(tokens, -1)
        for order, head, prev in zip(ORDERS, self.heads, self.prevs, strict=True):
            buckets = self._buckets(ngram_keys(tokens, order))
            links, last_buckets, last_pos = _link(buckets, positions[order - 1 : len(tokens)])
            first = links < 0
            links[first] = head[buckets[first]] - 1
            prev[positions[order - 1 : len(tokens)] % self.capacity] = links
            head[last_buckets] = last_pos + 1
        self.end += size
        self.starts.append(start)
        while len(self.starts) > self.max_responses:
            self.starts.popleft()
        self.floor = max(self.starts[0] if self.starts else self.end, self.end - self.capacity)

    def latest(self, row: np.ndarray, last: int, limit: int) -> list[int]:
        """The latest held positions that end in the same n-gram as ``row[last]``, per order."""
        found: dict[int, None] = {}
        if self.end == 0:
            return []
        for order, head, prev in zip(ORDERS, self.heads, self.prevs, strict=True):
            if last < order - 1:
                continue
            key = ngram_key(row, last, order)
            pos, taken = int(head[((key * _FIB) & _M64) >> (64 - self.bits)]) - 1, 0
            while pos >= self.floor and taken < limit:
                found[pos] = None
                taken += 1
                pos = int(prev[pos % self.capacity])
        return list(found)


class NgramContext(ContextSource):
    """Context drafts from n-gram hash chains in NumPy (see the module docstring); no compiled extension."""

    def __init__(
        self,
        max_depth: int = 24,
        cached_requests: int = 10000,
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
    ):
        super().__init__(max_depth, cached_requests, max_spec_factor, min_token_prob)
        self.requests: dict[object, _Request] = {}
        self.responses = _Responses(cached_requests) if cached_requests > 0 else None

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
                request = self.requests[req_id] = _Request(np.asarray(row[: n - len(sampled)]))
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
