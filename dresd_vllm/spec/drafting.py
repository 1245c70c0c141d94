"""One DReSD drafting step, in stages: learn, budget, search, dense, remember, context, price, emit.

Sources: the static dense index and the online dense index (searched together by the
:class:`~dresd_vllm.spec.retriever.Retriever`), and the request's own context (:class:`ContextSource`).
Each gives one chain per request with a per-position feature in [0, 1]. The :class:`Scorer` turns a
feature into the estimated chance that the position is accepted given the one before was, learnt
from what vLLM actually accepted (:class:`~dresd_vllm.spec.feedback.Feedback`); :func:`price_chains` cuts
each chain where that chance no longer pays for verifying the token, at the price of a draft token that
:class:`~dresd_vllm.spec.scoring.TokenPrice` fits from the engine's step times, and keeps per request the
chain with the larger expected net gain. The engine's proposer and `dresd-bench replay` both drive the
same :class:`Drafter`. Per-request state lives in flat arrays, one row per request (:class:`RequestRows`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dresd_vllm.config import DresdConfig
from dresd_vllm.online.spool_writer import SpoolWriter, open_spool
from dresd_vllm.online.store import OnlineStore, online_lists
from dresd_vllm.spec.context import ContextSource
from dresd_vllm.spec.feedback import Feedback
from dresd_vllm.spec.request_rows import RequestRows
from dresd_vllm.spec.retriever import Found, Retriever
from dresd_vllm.spec.scoring import (
    CONTEXT,
    CONTEXT_BUCKETS,
    DENSE,
    DENSE_BUCKETS,
    TOKEN_COST,
    TOKEN_COST_EXPONENT,
    Chains,
    Scorer,
    TokenPrice,
    price_chains,
)
from dresd_vllm.store.datastore import Datastore


@dataclasses.dataclass
class StepBatch:
    """One step's requests as the engine hands them over (see :meth:`Drafter.step`), with their rows."""

    req_ids: Sequence[object]
    sampled: Sequence[Sequence[int]]  # the tokens each request sampled this step (none: a partial prefill)
    num_tokens: np.ndarray  # int [B]: tokens so far, ``token_ids[i, :num_tokens[i]]``
    token_ids: np.ndarray
    counts: np.ndarray  # int64 [B]: len(sampled[i])
    rows: np.ndarray  # int64 [B]: the requests' rows of the per-request arrays (:class:`RequestRows`)


@dataclasses.dataclass
class DrafterStats:
    """Cumulative counters of a :class:`Drafter`, and two values now: ``online_keys`` and ``token_price``."""

    picked_dense: int = 0
    picked_context: int = 0
    dense_tokens: int = 0  # draft tokens that came from the dense chain
    context_tokens: int = 0
    context_s: float = 0.0
    score_s: float = 0.0
    online_keys: int = 0  # keys in the online store now
    stood_down: int = 0  # steps with no search: at that batch size no draft token could pay for itself
    token_price: float = 0.0  # the price of a draft token at the last step's batch size (share of a step)
    price_steps: int = 0  # engine steps the price was fitted on
    spooled_keys: int = 0  # verified states handed to the spool
    reloaded_keys: int = 0  # keys the online store took from the spool at start-up


class Drafter:
    """The whole drafting path of one DReSD proposer (see the module docstring).

    ``max_num_seqs`` sizes the per-request arrays (vLLM's scheduler limit). Only the output TP rank builds one
    (the proposer returns earlier on the others), so a configured spool always gets a writer.
    """

    def __init__(
        self,
        datastore: Datastore,
        config: DresdConfig,
        device: torch.device | str = "cpu",
        max_num_seqs: int = 256,
    ):
        self.config = config
        self.datastore = datastore
        self.length_control = config.length_control
        self.retriever = Retriever(
            datastore, top_k=config.top_k, merge=config.merge, min_support=config.min_support,
            max_candidates=config.max_candidates, search_threads=config.search_threads,
        )  # fmt: skip
        self.online: OnlineStore | None = None
        if config.online_store:
            size, index = config.online_store_size, datastore.index
            coarse = index.coarse_map(online_lists(size))
            self.online = OnlineStore(datastore.manifest.pca_dim, datastore.n_next, size, index.device, coarse=coarse)
        self.context: ContextSource | None = None
        if config.context:
            self.context = ContextSource(
                config.context_max_depth, config.context_cached_requests, min_token_prob=config.context_min_prob
            )
        self.scorer = Scorer(adapt=config.adapt)
        self.device_type = torch.device(device).type
        kind = "cuda" if self.device_type == "cuda" else "cpu"
        self.price = TokenPrice(TOKEN_COST[kind], TOKEN_COST_EXPONENT[kind], fixed=config.token_cost)
        self.stats = DrafterStats()
        self.rows = RequestRows(max_num_seqs)
        self.feedback = Feedback(self.scorer, self.price, max_num_seqs)
        self.spool: SpoolWriter | None = None
        if config.online_store_path is not None:
            path, size = Path(config.online_store_path), config.online_store_spool_bytes
            self.spool, self.stats.reloaded_keys = open_spool(path, datastore, self.online, size)
            self.stats.online_keys = len(self.online) if self.online is not None else 0

    def price_table(self) -> dict[int, float]:
        """The price of a draft token at batch sizes 1, 2, 4, ... up to ``max_num_seqs`` (for stats and reports)."""
        sizes = sorted({*(1 << i for i in range(self.rows.capacity.bit_length())), self.rows.capacity})
        return {batch: round(self.price(batch), 4) for batch in sizes}

    def step(
        self,
        req_ids: Sequence[object],
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens: np.ndarray,
        token_ids: np.ndarray,
        verified: torch.Tensor,
        max_len: np.ndarray,
        now: float | None = None,
    ) -> list[list[int]]:
        """Drafts for one step of the batch.

        ``verified`` holds, request after request, the states of this step's verified positions:
        ``len(sampled_token_ids[i])`` rows each, the last being the state that produced request i's
        last token. ``token_ids[i, :num_tokens[i]]`` are its tokens so far; ``max_len[i]`` caps its draft.
        ``now`` (``time.perf_counter()`` as the engine's step hands over) times the engine's steps, from
        which the price of a draft token is fitted; None (a replay, which has no engine steps) keeps the prior.
        """
        batch = len(req_ids)
        counts = np.fromiter(map(len, sampled_token_ids), np.int64, batch)
        if verified.shape[0] != counts.sum():
            raise RuntimeError(f"captured {verified.shape[0]} verified states for {int(counts.sum())} sampled tokens")
        b = StepBatch(req_ids, sampled_token_ids, num_tokens, token_ids, counts, self.rows(req_ids))
        self.feedback.learn(b.rows, counts, now, arrived=len(self.rows.arrived))
        self.stats.price_steps = self.price.steps
        width, threshold = self._budget(batch, max_len)
        dense_width = min(width, self.datastore.n_next)
        found = self._search(b, verified, search=dense_width > 0)
        sources: list[Chains] = []
        if found is not None and dense_width > 0:
            sources.append(self._dense(b, found, dense_width, width))
        if found is not None:
            self._remember(b, found)
        if self.context is not None:
            sources.append(self._context(b, width))
        if not sources or width <= 0:
            return [[] for _ in range(batch)]
        start = time.perf_counter()
        kinds, tokens, cells, lengths = price_chains(self.scorer, sources, max_len, threshold, self.length_control)
        self.feedback.record(b.rows, cells, lengths)
        drafts = self._emit(kinds, tokens, lengths)
        self.stats.score_s += time.perf_counter() - start
        return drafts

    def _budget(self, batch: int, max_len: np.ndarray) -> tuple[int, float]:
        """This step's draft width, and the reach a draft position must keep to pay for its verification.

        The width is 0 (a stand-down) where no position could reach that threshold.
        """
        width = int(max_len.max(initial=0))
        self.stats.token_price = self.price(batch)  # the share of a step one more token per request costs
        threshold = self.stats.token_price * self.feedback.tokens_per_step if self.length_control else 0.0
        if width > 0 and threshold > self.scorer.best():
            # No position can reach the threshold `cut` keeps at: skip the searches, keep the stores and trees current.
            width = 0
            self.stats.stood_down += 1
        return width, threshold

    def _search(self, b: StepBatch, verified: torch.Tensor, search: bool) -> Found | None:
        """Projection, both searches (unless not ``search``) and one copy back; None without verified states.

        The online store's pending values take this step's tokens first; its keys are assigned even when
        nothing is searched.
        """
        if self.online is not None:
            self.online.fill(self.rows.codes[b.rows], b.token_ids, b.num_tokens)
        if not verified.shape[0]:
            return None
        return self.retriever.search(verified, np.cumsum(b.counts) - 1, self.online, search)

    def _dense(self, b: StepBatch, found: Found, dense_width: int, width: int) -> Chains:
        """The dense source's chain per request: the merged survivors' path, as long as its length policy keeps."""
        batch = len(b.sampled)
        # -1 never matches a stored token: partial prefills (no token sampled) get no draft.
        last_tokens = np.fromiter((t[-1] if t else -1 for t in b.sampled), np.int64, batch)
        dense = self.retriever.candidates(found, last_tokens, dense_width)
        keep = np.arange(dense_width) < self.retriever.chain_lengths(dense, self.length_control)[:, None]
        tokens = np.full((batch, width), -1, dtype=np.int64)
        support = np.zeros((batch, width), dtype=np.float32)
        tokens[:, :dense_width] = np.where(keep, dense.tokens, -1)
        support[:, :dense_width] = np.where(keep, dense.support, 0.0)
        return Chains(DENSE, tokens, support, np.searchsorted(DENSE_BUCKETS, dense.survivors, "right"))

    def _remember(self, b: StepBatch, found: Found) -> None:
        """This step's verified states join the online store and the spool, each with its token's position."""
        counts = b.counts
        positions = np.repeat(b.num_tokens[: len(b.req_ids)] - counts, counts) + _ranks(counts)
        if self.online is not None:
            self.online.add(found.keys, np.repeat(self.rows.codes[b.rows], counts), positions, found.lists)
            self.stats.online_keys = len(self.online)
        if self.spool is not None:
            sampled = np.fromiter(itertools.chain.from_iterable(b.sampled), np.int32, len(found.keys))
            self.spool.append(found.keys, sampled, positions, np.repeat(self.rows.tags[b.rows], counts))
            self.stats.spooled_keys += len(sampled)

    def _context(self, b: StepBatch, width: int) -> Chains:
        """The context source's chain per request (its trees are kept current even at width 0)."""
        assert self.context is not None
        start = time.perf_counter()
        chains = self.context.candidates(b.req_ids, b.sampled, b.num_tokens, b.token_ids, width)
        self.stats.context_s += time.perf_counter() - start
        return Chains(CONTEXT, chains.tokens, chains.probs, np.searchsorted(CONTEXT_BUCKETS, chains.match_len, "right"))

    def _emit(self, kinds: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
        """The chosen chains cut to their lengths, counted by source."""
        dense = kinds == DENSE
        self.stats.picked_dense += int(np.count_nonzero(lengths[dense]))
        self.stats.dense_tokens += int(lengths[dense].sum())
        self.stats.picked_context += int(np.count_nonzero(lengths[~dense]))
        self.stats.context_tokens += int(lengths[~dense].sum())
        return [draft[:n] for draft, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]

    def close(self) -> None:
        """Write what the spool holds in memory and stop its writer (also done at interpreter exit)."""
        if self.spool is not None:
            self.spool.close()


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[i] - 1 for each i, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
