"""n-gram hash chains: the latest earlier occurrences of a context's last tokens, found in O(latest).

For each n-gram order in `ORDERS` a hash chain links every position to the previous one that ends in
the same n-gram (zlib's match finder), so the latest earlier occurrences are read in O(limit), however
long the sequence, and a new token is linked in O(1). :class:`RequestChains` indexes one request's own
tokens; :class:`ResponseRing` a ring of finished responses (at most `GLOBAL_TOKENS` tokens) with
bucketed chains. :class:`~dresd_vllm.spec.context_ngram.NgramContext` drafts from both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

ORDERS = (1, 4)
"""n-gram lengths with a hash chain: order 1 finds the recent matches of any length, order 4 the long ones further
back."""
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


class RequestChains:
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


class ResponseRing:
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
