"""One DReSD drafting step: capture -> sources -> candidates -> score -> cut -> draft.

Sources: the static dense index and the online dense index (searched together by the
:class:`~dresd_vllm.retriever.Retriever`), and the request's own context (:class:`ContextSource`).
Each gives one chain per request with a per-position feature in [0, 1]. The :class:`Scorer` turns a
feature into the estimated chance that the position is accepted given the one before was, from a
table of cells (source, strength bucket, depth, feature bin) learnt from what vLLM actually
accepted; the product along the chain is the chance the position is reached and accepted.
:func:`cut` stops a chain where that chance no longer pays for verifying the token, and :func:`pick`
keeps, per request, the chain with the larger expected net gain, at the price of a draft token that
:class:`~dresd_vllm.scoring.TokenPrice` fits from the engine's step times. The engine's proposer and
`dresd-bench replay` both drive the same :class:`Drafter`.

Per-request state lives in flat arrays with one row per request (:class:`RequestRows`), sized once to
vLLM's ``max_num_seqs``: each step reads and writes them with one gather, scatter or ``bincount``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import DresdConfig
from .context import ContextSource
from .datastore import Datastore
from .online_store import OnlineStore, online_lists
from .retriever import Retriever
from .scoring import (
    CONTEXT,
    CONTEXT_BUCKETS,
    DENSE,
    DENSE_BUCKETS,
    TOKEN_COST,
    TOKEN_COST_EXPONENT,
    Scorer,
    TokenPrice,
    conditional,
    cut,
    gain,
    pick,
)
from .spool import SpoolWriter, projection_id, read_spool

# The running mean of tokens per request and step adapts with this rate.
TOKENS_PER_STEP_RATE = 0.02
# A gap between two steps longer than this is the engine idling between requests, not a step.
IDLE_S = 1.0


@dataclasses.dataclass
class DrafterStats:
    """Cumulative counters of a :class:`Drafter`."""

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


class RequestRows:
    """Request ids -> rows of the drafter's per-request arrays, ``capacity`` (vLLM's max_num_seqs) rows.

    A request keeps its row from the first step it is in the batch to the first it is not (vLLM's input
    batch condenses its own rows as requests finish, so its row indices cannot be kept across steps).
    Work per request happens only when requests arrive or leave; a step with the same batch as the one
    before costs one list comparison.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: dict[object, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._last_ids: list[object] = []
        self._last_rows = np.zeros(0, dtype=np.int64)
        self.tags = np.zeros(capacity, dtype=np.int64)  # the request's hash: the same request, the same tag
        self.arrived = np.zeros(0, dtype=np.int64)  # positions in the batch of the requests new in the last call

    def __call__(self, req_ids: Sequence[object]) -> np.ndarray:
        """The rows ``int64 [B]`` of this step's requests; rows of requests that left are freed."""
        ids = list(req_ids)
        if ids == self._last_ids:
            self.arrived = self.arrived[:0]
            return self._last_rows
        if len(ids) > self.capacity:
            raise RuntimeError(f"a batch of {len(ids)} requests is more than the {self.capacity} rows sized for it")
        rows = np.fromiter(map(self._rows.get, ids, itertools.repeat(-1)), np.int64, len(ids))
        self.arrived = np.flatnonzero(rows < 0)
        if len(self._rows) > len(ids) - len(self.arrived):
            for gone in self._rows.keys() - set(ids):
                self._free.append(self._rows.pop(gone))
        for i in self.arrived.tolist():
            rows[i] = self._rows[ids[i]] = row = self._free.pop()
            self.tags[row] = hash(ids[i])
        self._last_ids, self._last_rows = ids, rows
        return rows


class Drafter:
    """The whole drafting path of one DReSD proposer (see the module docstring).

    ``max_num_seqs`` sizes the per-request arrays (vLLM's scheduler limit). ``spool`` lets this
    drafter write the configured spool (one writer per engine: the output rank's drafter).
    """

    def __init__(
        self,
        datastore: Datastore,
        config: DresdConfig,
        device: torch.device | str = "cpu",
        max_num_seqs: int = 256,
        spool: bool = True,
    ):
        self.config = config
        self.datastore = datastore
        self.length_control = config.length_control
        self.retriever = Retriever(
            datastore,
            top_k=config.top_k,
            merge=config.merge,
            min_support=config.min_support,
            max_candidates=config.max_candidates,
            search_threads=config.search_threads,
        )
        self.online = (
            OnlineStore(
                datastore.manifest.pca_dim,
                datastore.n_next,
                config.online_store_size,
                datastore.index.device,
                coarse=datastore.index.coarse_map(online_lists(config.online_store_size)),
            )  # fmt: skip
            if config.online_store
            else None
        )
        self.context = (
            ContextSource(
                max_depth=config.context_max_depth,
                cached_requests=config.context_cached_requests,
                min_token_prob=config.context_min_prob,
            )
            if config.context
            else None
        )
        self.scorer = Scorer(adapt=config.adapt)
        self.device_type = torch.device(device).type
        kind = "cuda" if self.device_type == "cuda" else "cpu"
        self.price = TokenPrice(TOKEN_COST[kind], TOKEN_COST_EXPONENT[kind], fixed=config.token_cost)
        self.tokens_per_step = 1.0
        self.stats = DrafterStats()
        self.rows = RequestRows(max_num_seqs)
        # Per row: the cells of the request's last draft and its length (0: none), and its last step's
        # sampled tokens (0: a partial prefill, or new).
        self._cells = np.zeros((max_num_seqs, 0), dtype=np.int64)
        self._draft_len = np.zeros(max_num_seqs, dtype=np.int64)
        self._sampled = np.zeros(max_num_seqs, dtype=np.int64)
        self._last_start: float | None = None
        self.spool: SpoolWriter | None = None
        if config.online_store_path is not None:
            self._open_spool(Path(config.online_store_path), write=spool)

    def _open_spool(self, path: Path, write: bool) -> None:
        """Reload the spool into the online store (newest keys first, up to its capacity), then append to it."""
        identity = projection_id(self.datastore.projection)
        if self.online is not None:
            capacity = self.online.capacity
            spooled = read_spool(path, identity, max_rows=capacity)
            newest = slice(max(len(spooled.keys) - capacity, 0), None)
            keys, values = spooled.keys[newest], spooled.values(self.datastore.n_next)[newest]
            self.online.add_complete(torch.from_numpy(keys), values)
            self.stats.reloaded_keys = len(keys)
            self.stats.online_keys = len(self.online)
        if write:
            self.spool = SpoolWriter(
                path,
                identity,
                self.datastore.manifest.pca_dim,
                self.config.online_store_spool_bytes,
                device=self.datastore.index.device,
            )

    def token_cost(self, batch: int) -> float:
        """Share of a step that one more verified token per request costs, at this batch size."""
        return self.price(batch)

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
        rows = self.rows(req_ids)
        self._learn(rows, counts, now)
        # -1 never matches a stored token: partial prefills (no token sampled) get no draft.
        last_tokens = np.fromiter((t[-1] if t else -1 for t in sampled_token_ids), np.int64, batch)
        width = int(max_len.max(initial=0))
        self.stats.token_price = self.token_cost(batch)
        threshold = self.stats.token_price * self.tokens_per_step if self.length_control else 0.0
        if width > 0 and threshold > self.scorer.best():
            # No position can reach the threshold `cut` keeps at: skip the searches, keep the stores and trees current.
            width = 0
            self.stats.stood_down += 1
        sources: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (source, tokens, cumulative, bucket)
        if self.online is not None:
            self.online.fill(req_ids, token_ids, num_tokens)
        dense_width = min(width, self.datastore.n_next)
        # Projection, both searches and one copy back; the online store's keys even when nothing is searched.
        found = (
            self.retriever.search(verified, np.cumsum(counts) - 1, self.online, dense_width > 0)
            if verified.shape[0]
            else None
        )
        if found is not None and dense_width > 0:
            dense = self.retriever.candidates(found, last_tokens, dense_width)
            tokens = np.full((batch, width), -1, dtype=np.int64)
            support = np.zeros((batch, width), dtype=np.float32)
            own = dense.lengths(0.0 if self.length_control else self.retriever.min_support)
            if self.retriever.merge == "top1" and not self.length_control:
                own = np.where(dense.survivors > 0, dense_width, 0)
            keep = np.arange(dense_width) < own[:, None]
            tokens[:, :dense_width] = np.where(keep, dense.tokens, -1)
            support[:, :dense_width] = np.where(keep, dense.support, 0.0)
            sources.append((DENSE, tokens, support, np.searchsorted(DENSE_BUCKETS, dense.survivors, "right")))
        # The position of the token each verified state produced.
        positions = np.repeat(num_tokens[:batch] - counts, counts) + _ranks(counts)
        if self.online is not None and found is not None:
            owners = np.repeat(np.asarray(req_ids, dtype=object), counts)
            self.online.add(found.keys, list(owners), positions, found.lists)
            self.stats.online_keys = len(self.online)
        if self.spool is not None and found is not None:
            sampled = np.fromiter(itertools.chain.from_iterable(sampled_token_ids), np.int32, len(found.keys))
            self.spool.append(found.keys, sampled, positions, np.repeat(self.rows.tags[rows], counts))
            self.stats.spooled_keys += len(sampled)
        if self.context is not None:
            start = time.perf_counter()
            chains = self.context.candidates(req_ids, sampled_token_ids, num_tokens, token_ids, width)
            self.stats.context_s += time.perf_counter() - start
            bucket = np.searchsorted(CONTEXT_BUCKETS, chains.match_len, "right")
            sources.append((CONTEXT, chains.tokens, chains.probs, bucket))
        if not sources or width <= 0:
            return [[] for _ in range(batch)]

        # Every source's chains are scored in one pass: row s * batch + i is source s's chain of request i.
        start = time.perf_counter()
        kinds = np.repeat([source for source, *_ in sources], batch)
        tokens = np.concatenate([t for _, t, _, _ in sources])
        cells = self.scorer.cells(
            kinds,
            conditional(np.concatenate([c for _, _, c, _ in sources])),
            np.concatenate([b for *_, b in sources]),
        )
        present = tokens >= 0
        reach = np.cumprod(np.where(present, self.scorer.probability(cells), 0.0), axis=1)
        # A chain ends at its first missing token, whatever the threshold (a price of 0 keeps every reach).
        caps = np.minimum(np.tile(max_len, len(sources)), np.logical_and.accumulate(present, axis=1).sum(axis=1))
        lengths = np.minimum(cut(reach, threshold) if self.length_control else present.sum(axis=1), caps)
        gains = gain(reach, lengths, threshold).reshape(len(sources), batch)
        chosen = pick(gains) * batch + np.arange(batch) if len(sources) > 1 else np.arange(batch)
        lengths, kinds = lengths[chosen], kinds[chosen]
        if width > self._cells.shape[1]:
            self._cells = np.zeros((self.rows.capacity, width), dtype=np.int64)
        self._cells[rows, :width] = cells[chosen]
        self._draft_len[rows] = lengths
        dense = kinds == DENSE
        self.stats.picked_dense += int(np.count_nonzero(lengths[dense]))
        self.stats.dense_tokens += int(lengths[dense].sum())
        self.stats.picked_context += int(np.count_nonzero(lengths[~dense]))
        self.stats.context_tokens += int(lengths[~dense].sum())
        drafts = [draft[:n] for draft, n in zip(tokens[chosen].tolist(), lengths.tolist(), strict=True)]
        self.stats.score_s += time.perf_counter() - start
        return drafts

    def _learn(self, rows: np.ndarray, counts: np.ndarray, now: float | None) -> None:
        """Feed back what vLLM accepted of each request's previous draft (its sampled tokens less one), and
        the time of the engine step that verified those drafts."""
        drafted = self._draft_len[rows]
        done = counts > 0
        fed = done & (drafted > 0)
        self.scorer.update(self._cells[rows[fed]], drafted[fed], counts[fed] - 1)
        self._draft_len[:] = 0  # a draft is verified in the next step, or (its request out of the batch) never
        # The running mean of tokens per step, over the requests in batch order: the closed form of one
        # update per request.
        sampled = counts[done]
        decay = 1.0 - TOKENS_PER_STEP_RATE
        weights = TOKENS_PER_STEP_RATE * decay ** np.arange(len(sampled) - 1, -1, -1)
        self.tokens_per_step = decay ** len(sampled) * self.tokens_per_step + float(weights @ sampled)
        # This step's forward pass verified a token per request plus its draft; steps that also prefilled
        # (a request new to the batch or in a partial prefill) say nothing of a draft token's price.
        if now is not None:
            last, self._last_start = self._last_start, now
            prefill = len(self.rows.arrived) or not done.all() or np.any(self._sampled[rows] == 0)
            if last is not None and not prefill and now - last < IDLE_S:
                self.price.observe(len(rows), len(rows) + int(drafted.sum()), now - last)
                self.stats.price_steps = self.price.steps
        self._sampled[rows] = counts

    def close(self) -> None:
        """Write what the spool holds in memory and stop its writer (also done at interpreter exit)."""
        if self.spool is not None:
            self.spool.close()


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[i] - 1 for each i, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
