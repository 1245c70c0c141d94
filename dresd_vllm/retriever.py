"""From hidden states to one draft per request: project, search, filter, merge.

vLLM verifies one chain per request, so the paper's top-10 drafts are merged
into one: the survivors' continuations form a prefix trie whose nodes weigh the
similarity of the survivors under them, and the draft follows the heaviest
branch. The merge is vectorised over the batch (no trie objects, no dict per key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import faiss
import numpy as np
import torch

from dresd_vllm.datastore import Datastore
from dresd_vllm.online_store import OnlineStore

MERGES = ("trie", "top1")
# Survivors weigh their cosine similarity, floored so that a survivor with a
# negative similarity still counts and the total weight is never zero.
_MIN_WEIGHT = 1e-3


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` OpenMP threads, then give the calling thread back its own setting.

    FAISS and torch share one OpenMP runtime when Intel OpenMP is preloaded, and the setting is the
    calling thread's: left at ``n``, it would also be the thread count of the model's next forward pass.
    """
    if n is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


@dataclasses.dataclass
class RetrieverStats:
    """Cumulative counters of a :class:`Retriever` (seconds are wall time in each stage)."""

    calls: int = 0
    requests: int = 0
    projection_s: float = 0.0
    search_s: float = 0.0
    merge_s: float = 0.0  # first-token filter, continuation gather and merge
    hits: int = 0  # neighbours found, before the first-token filter
    survivors: int = 0  # neighbours whose first token matched
    draft_tokens: int = 0
    online_survivors: int = 0  # online-store neighbours whose first token matched

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)

    def snapshot(self) -> RetrieverStats:
        return dataclasses.replace(self)


class Retriever:
    """Drafts for a batch of requests from their hidden states and a :class:`Datastore`.

    ``merge="trie"`` walks the survivors' prefix trie, at each depth taking the
    child with the largest total similarity (ties go to the branch holding the
    nearest survivor), and stops at the first depth where that branch holds less
    than ``min_support`` of all survivors' similarity: a rough estimate of the
    chance the draft is still right. ``min_support=0`` keeps the whole heaviest path.
    ``merge="top1"`` drafts the nearest survivor's continuation. Only the nearest
    ``max_candidates`` survivors (at most ``top_k``) are merged: the paper's top 10 of top 50.
    ``search_threads`` (None: the caller's) OpenMP threads search, only for the search itself.
    """

    def __init__(
        self,
        datastore: Datastore,
        top_k: int = 50,
        merge: str = "trie",
        min_support: float = 0.2,
        max_candidates: int = 10,
        search_threads: int | None = None,
    ):
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}, expected one of {MERGES}")
        if top_k < 1 or max_candidates < 1:
            raise ValueError(f"top_k ({top_k}) and max_candidates ({max_candidates}) must be >= 1")
        if not 0.0 <= min_support <= 1.0:
            raise ValueError(f"min_support must be in [0, 1], got {min_support}")
        self.datastore = datastore
        self.top_k = top_k
        self.merge = merge
        self.min_support = min_support
        self.max_candidates = min(max_candidates, top_k)
        self.search_threads = search_threads
        self.stats = RetrieverStats()

    def draft(self, hidden: torch.Tensor, last_tokens: np.ndarray, max_len: int | np.ndarray) -> list[list[int]]:
        """One draft (possibly ``[]``) of at most ``max_len[i]`` tokens per request.

        ``hidden [B, H]`` row i is the state that produced ``last_tokens[i]``;
        a ``last_tokens`` entry of -1 matches nothing and gets no draft.
        """
        batch = hidden.shape[0]
        max_len = np.broadcast_to(np.asarray(max_len, dtype=np.int64), (batch,))
        width = min(int(max_len.max(initial=0)), self.datastore.n_next)
        if width <= 0:
            self.stats.calls += 1
            self.stats.requests += batch
            return [[] for _ in range(batch)]
        start = time.perf_counter()
        queries = self.datastore.projection(hidden)
        self.stats.projection_s += time.perf_counter() - start
        found = self.candidates(queries, last_tokens, width)
        lengths = np.minimum(found.lengths(self.min_support if self.merge == "trie" else 0.0), max_len)
        self.stats.draft_tokens += int(lengths.sum())
        return [found.tokens[i, : lengths[i]].tolist() for i in range(batch)]

    def candidates(
        self, queries: torch.Tensor, last_tokens: np.ndarray, width: int, online: OnlineStore | None = None
    ) -> DenseCandidates:
        """The merged chain of ``width`` tokens per request from projected ``queries [B, d]``.

        Hits of the static index and of ``online`` (searched alike, ``top_k`` each) compete on
        similarity for the ``max_candidates`` slots. Online hits whose continuation is not known yet
        do not count.
        """
        batch = queries.shape[0]
        last_tokens = np.asarray(last_tokens, dtype=np.int64)
        if last_tokens.shape != (batch,):
            raise ValueError(f"last_tokens must have shape ({batch},), got {last_tokens.shape}")
        stats = self.stats
        stats.calls += 1
        stats.requests += batch
        start = time.perf_counter()
        with omp_threads(self.search_threads):
            scores, ids = self.datastore.index.search(queries, self.top_k)
        searched = time.perf_counter()

        keep = self.datastore.first_tokens(ids) == last_tokens[:, None]
        stats.hits += int((ids >= 0).sum())
        stats.survivors += int(keep.sum())
        rows = np.arange(batch)[:, None]  # fancy-indexes [B, C] picks (take_along_axis costs more per call)
        if online is not None and len(online):
            o_scores, o_values = online.search(queries, self.top_k)
            o_keep = (o_values[:, :, 0] == last_tokens[:, None]) & (o_values[:, :, 1] >= 0)
            stats.online_survivors += int(o_keep.sum())
            # Static hits come best first, so one stable sort of both lists keeps their order and gives ties
            # to the static index; non-survivors (-inf) of the static list pad a request short of survivors.
            pooled = np.concatenate([np.where(keep, scores, -np.inf), np.where(o_keep, o_scores, -np.inf)], axis=1)
            order = np.argsort(-pooled, axis=1, kind="stable")[:, : self.max_candidates]
            cand_scores = pooled[rows, order]
            valid = np.isfinite(cand_scores)
            static = order < ids.shape[1]
            static_ids = ids[rows, np.where(static, order, 0)]
            values = self.datastore.continuations(np.where(valid & static, static_ids, -1))
            online_values = o_values[rows, np.where(static, 0, order - ids.shape[1])]
            values = np.where(static[:, :, None], values, online_values)
        else:
            # The best max_candidates survivors per request in score order, padded with invalid slots.
            order = np.argsort(~keep, axis=1, kind="stable")[:, : self.max_candidates]
            valid = keep[rows, order]
            cand_scores = np.where(valid, scores[rows, order], -np.inf)
            values = self.datastore.continuations(np.where(valid, ids[rows, order], -1))
        drafts = values[:, :, 1 : 1 + width]
        if self.merge == "top1":
            chains = drafts[:, 0].astype(np.int64)
            support = np.broadcast_to(valid[:, :1], chains.shape).astype(np.float32)
        else:
            weights = np.where(valid, np.maximum(cand_scores, _MIN_WEIGHT), 0.0).astype(np.float32)
            chains, support = trie_path(drafts, weights, valid)
        # An online value not known yet (-1) ends the chain.
        support = np.where(np.logical_and.accumulate(chains >= 0, axis=1), support, 0.0).astype(np.float32)
        stats.search_s += searched - start
        stats.merge_s += time.perf_counter() - searched
        top = np.where(valid[:, 0], cand_scores[:, 0], 0.0)
        return DenseCandidates(chains, support, valid.sum(axis=1), top, drafts, valid)


@dataclasses.dataclass
class DenseCandidates:
    """One merged chain per request and what it rests on."""

    tokens: np.ndarray  # int64 [B, W]
    support: np.ndarray  # float32 [B, W]: share of the survivors' weight still on the chain at depth j; 0 = none
    survivors: np.ndarray  # int64 [B]
    top_similarity: np.ndarray  # float32 [B]: similarity of the nearest survivor (0 without one)
    drafts: np.ndarray | None = None  # int32 [B, C, W]: every merged survivor's continuation, best first
    valid: np.ndarray | None = None  # bool [B, C]

    def lengths(self, min_support: float) -> np.ndarray:
        """Chain lengths where the support stays >= ``min_support`` (and > 0)."""
        # The relative slack keeps a branch that every survivor shares at exactly 1.0 support.
        enough = (self.support >= min_support * (1 - 1e-6)) & (self.support > 0)
        return np.logical_and.accumulate(enough, axis=1).sum(axis=1)


def merge_trie(
    drafts: np.ndarray, weights: np.ndarray, valid: np.ndarray, min_support: float
) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``drafts [B, C, W]`` (candidates best first) into one chain per request.

    ``weights [B, C]`` are the candidates' similarity weights (0 where ``valid`` is False).
    Returns ``(chains [B, W], lengths [B])``: row b's draft is ``chains[b, :lengths[b]]``, cut at the
    first depth where its branch holds less than ``min_support`` of the total weight.
    """
    chains, support = trie_path(drafts, weights, valid)
    lengths = DenseCandidates(chains, support, valid.sum(axis=1), np.zeros(len(chains))).lengths(min_support)
    return chains, lengths


def trie_path(drafts: np.ndarray, weights: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The heaviest path of the prefix trie of ``drafts [B, C, W]`` (candidates best first).

    ``weights [B, C]`` are the candidates' similarity weights (0 where ``valid`` is False).
    Returns ``(chains int64 [B, W], support float32 [B, W])``: support is the share of the total
    weight on the chain's branch at each depth (non-increasing; 0 for a request without survivors).

    The greedy heaviest-branch walk is computed without walking: candidate ``a``
    lies on the greedy path iff, against every candidate ``c``, its branch wins at
    the depth where ``a`` and ``c`` first differ (larger weight, ties to the branch
    holding the better-ranked candidate). The first such ``a`` gives the chain.
    """
    batch, _, width = drafts.shape
    # shared[b, a, c, j]: candidates a and c agree on tokens 0..j
    shared = np.logical_and.accumulate(drafts[:, :, None, :] == drafts[:, None, :, :], axis=3)
    counted = shared & valid[:, None, :, None]
    branch_weight = np.einsum("bacj,bc->baj", counted.astype(np.float32), weights)  # [B, C, W]
    best_member = counted.argmax(axis=2)  # [B, C, W]: best-ranked valid candidate in a's branch
    common = shared.sum(axis=3)  # [B, C, C]: length of a's and c's common prefix
    depth = np.minimum(common, width - 1)
    b, a = np.arange(batch)[:, None, None], np.arange(drafts.shape[1])[None, :, None]
    w_a = branch_weight[b, a, depth]  # weight of a's branch where a and c split
    m_a = best_member[b, a, depth]
    w_c, m_c = w_a.transpose(0, 2, 1), m_a.transpose(0, 2, 1)
    wins = (w_a > w_c) | ((w_a == w_c) & (m_a <= m_c)) | (common == width) | ~valid[:, None, :]
    on_path = wins.all(axis=2) & valid
    winner = on_path.argmax(axis=1)
    chains = drafts[np.arange(batch), winner].astype(np.int64)
    total = np.maximum(weights.sum(axis=1, keepdims=True), _MIN_WEIGHT)
    support = branch_weight[np.arange(batch), winner] / total  # non-increasing along the chain
    return chains, np.where(valid.any(axis=1, keepdims=True), support, 0.0).astype(np.float32)
