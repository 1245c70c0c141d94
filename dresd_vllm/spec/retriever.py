"""From hidden states to one draft per request: project, search, copy back, filter, merge.

The hits that pass the first-token filter are merged into one chain per request
(:mod:`dresd_vllm.spec.trie_merge`), whose length :meth:`Retriever.chain_lengths` decides.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from dresd_vllm.index.host_copy import HostCopy
from dresd_vllm.index.threads import omp_threads
from dresd_vllm.online.store import OnlineStore
from dresd_vllm.spec.trie_merge import MIN_WEIGHT, DenseCandidates, trie_path
from dresd_vllm.store.datastore import Datastore

MERGES = ("trie", "top1")


@dataclasses.dataclass
class RetrieverStats:
    """Cumulative counters of a :class:`Retriever` (seconds are wall time in each stage).

    On a GPU the stages before the copy back only launch their work; ``copy_s`` holds the wait for it.
    """

    calls: int = 0
    requests: int = 0
    projection_s: float = 0.0
    search_s: float = 0.0  # the datastore's index
    online_search_s: float = 0.0  # the online store
    copy_s: float = 0.0  # the one copy of the step's results back to the host
    merge_s: float = 0.0  # first-token filter, continuation gather and merge
    hits: int = 0  # neighbours found, before the first-token filter
    survivors: int = 0  # neighbours whose first token matched
    online_survivors: int = 0  # online-store neighbours whose first token matched

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)

    def snapshot(self) -> RetrieverStats:
        return dataclasses.replace(self)


@dataclasses.dataclass
class Found:
    """One step's search results, on the host after one copy back (see :meth:`Retriever.search`)."""

    keys: torch.Tensor  # [R, d] every verified state projected, on the device (what the online store adds)
    lists: np.ndarray | None  # int64 [R]: each key's online-store list (None without a store)
    scores: np.ndarray  # float32 [B, k]: the datastore's hits, best first (-inf: none)
    ids: np.ndarray  # int64 [B, k] (-1: none)
    online_scores: np.ndarray | None  # float32 [B, k]: the online store's hits (None: not searched)
    online_values: np.ndarray | None  # int32 [B, k, n_next + 1]


class Retriever:
    """Drafts for a batch of requests from their hidden states and a :class:`Datastore`.

    :meth:`search` projects the states and searches the datastore and the online store;
    :meth:`candidates` filters and merges the hits. ``merge="trie"`` walks the survivors' prefix
    trie, at each depth taking the child with the largest total similarity (ties go to the branch
    holding the nearest survivor); its support at each depth (the branch's share of all survivors'
    similarity) is a rough estimate of the chance the draft is still right, where ``min_support``
    may cut it. ``merge="top1"`` drafts the nearest survivor's continuation. Only the nearest
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
        self._copy = HostCopy()

    def search(
        self, verified: torch.Tensor, rows: np.ndarray, online: OnlineStore | None = None, search: bool = True
    ) -> Found:
        """Project ``verified [R, H]``, search with rows ``rows [B]`` of it, and copy the results back once.

        Both indexes are searched (``top_k`` each) unless ``search`` is False; the online store only
        when it holds keys. Nothing waits on the device until the one copy back; a state with NaN/inf
        raises ValueError after it.
        """
        stats = self.stats
        stats.calls += 1
        stats.requests += len(rows)
        start = time.perf_counter()
        keys, finite = self.datastore.projection.project(verified)
        queries = keys[torch.from_numpy(np.maximum(rows, 0)).to(keys.device, non_blocking=True)]
        projected = time.perf_counter()
        stats.projection_s += projected - start
        device: list[torch.Tensor] = [finite]
        if search:
            with omp_threads(self.search_threads):
                device += self.datastore.index.search_tensors(queries, self.top_k)
        searched = time.perf_counter()
        if search:
            stats.search_s += searched - projected
        searching_online = search and online is not None and len(online) > 0
        if online is not None:
            device.append(online.assign(keys))
            if searching_online:
                device += online.search_tensors(queries, self.top_k)
            stats.online_search_s += time.perf_counter() - searched
        start = time.perf_counter()
        host = self._copy(device)
        stats.copy_s += time.perf_counter() - start
        if not host[0].all():
            bad = np.flatnonzero(~host[0])
            raise ValueError(
                f"hidden states contain NaN/inf in {len(bad)} of {len(host[0])} rows (rows {bad[:8].tolist()})"
            )
        empty = np.empty((len(rows), 0))
        scores, ids = (host[1], host[2]) if search else (empty.astype(np.float32), empty.astype(np.int64))
        lists = host[3 if search else 1] if online is not None else None
        o_scores = o_values = None
        if searching_online:
            assert online is not None
            o_scores, o_values = host[4], online.values_of(host[5])
        return Found(keys, lists, scores, ids, o_scores, o_values)

    def chain_lengths(self, dense: DenseCandidates, length_control: bool) -> np.ndarray:
        """The dense chain's length policy: how much of each merged chain a draft may use, int64 ``[B]``.

        With length control the scorer cuts the chain later, so all of it that has support; without,
        ``"top1"`` drafts the whole chain of a request with survivors and ``"trie"`` stops where the
        support falls below ``min_support``.
        """
        if length_control:
            return dense.lengths(0.0)
        if self.merge == "top1":
            return np.where(dense.survivors > 0, dense.tokens.shape[1], 0)
        return dense.lengths(self.min_support)

    def candidates(self, found: Found, last_tokens: np.ndarray, width: int) -> DenseCandidates:
        """The merged chain of ``width`` tokens per request from the hits of :meth:`search`.

        Hits of the static index and of the online store compete on similarity for the
        ``max_candidates`` slots. Online hits whose continuation is not known yet do not count.
        """
        scores, ids = found.scores, found.ids
        batch = scores.shape[0]
        last_tokens = np.asarray(last_tokens, dtype=np.int64)
        if last_tokens.shape != (batch,):
            raise ValueError(f"last_tokens must have shape ({batch},), got {last_tokens.shape}")
        stats = self.stats
        start = time.perf_counter()
        keep = self.datastore.first_tokens(ids) == last_tokens[:, None]
        stats.hits += int((ids >= 0).sum())
        stats.survivors += int(keep.sum())
        rows = np.arange(batch)[:, None]  # fancy-indexes [B, C] picks (take_along_axis costs more per call)
        if found.online_values is not None and found.online_scores is not None:
            o_scores, o_values = found.online_scores, found.online_values
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
            weights = np.where(valid, np.maximum(cand_scores, MIN_WEIGHT), 0.0).astype(np.float32)
            chains, support = trie_path(drafts, weights, valid)
        # An online value not known yet (-1) ends the chain.
        support = np.where(np.logical_and.accumulate(chains >= 0, axis=1), support, 0.0).astype(np.float32)
        stats.merge_s += time.perf_counter() - start
        return DenseCandidates(chains, support, valid.sum(axis=1), drafts, valid)
