"""One DReSD drafting step: capture -> sources -> candidates -> score -> cut -> draft.

Sources: the static dense index and the online dense index (searched together by the
:class:`~dresd_vllm.retriever.Retriever`), and the request's own context (:class:`ContextSource`).
Each gives one chain per request with a per-position feature in [0, 1]. The :class:`Scorer` turns a
feature into the estimated chance that the position is accepted given the one before was, from a
table of cells (source, strength bucket, depth, feature bin) learnt from what vLLM actually
accepted; the product along the chain is the chance the position is reached and accepted.
:func:`cut` stops a chain where that chance no longer pays for verifying the token, and :func:`pick`
keeps, per request, the chain with the larger expected net gain. The engine's proposer and
`dresd-bench replay` both drive the same :class:`Drafter`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import torch

from .config import DresdConfig
from .context import ContextSource
from .datastore import Datastore
from .online_store import OnlineStore, online_lists
from .retriever import Retriever
from .scoring import CONTEXT, CONTEXT_BUCKETS, DENSE, DENSE_BUCKETS, Scorer, conditional, cut, gain, pick

# The running mean of tokens per request and step adapts with this rate.
TOKENS_PER_STEP_RATE = 0.02
# What one more verified draft token per request adds to a step's time, as a share of the step, when the
# user gives no token_cost: TOKEN_COST * batch ** TOKEN_COST_EXPONENT, at most 1. Fitted to this project's
# CPU machine (vLLM's step): at batch 1, +50% for 10 draft tokens on the tiny model and +20% for 5.5 on
# SmolLM2-135M (0.04 a token); through the server at concurrency 16 on SmolLM2, with the proposer of
# commit 657dc05 (before this curve), +48% for 0.49 draft tokens per request (0.98: the step is
# compute-bound, its time proportional to the tokens it verifies).
# The GPU's is a guess for a step that stays memory-bound.
TOKEN_COST = {"cpu": 0.04, "cuda": 0.004}
TOKEN_COST_EXPONENT = {"cpu": 1.15, "cuda": 1.0}


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


class Drafter:
    """The whole drafting path of one DReSD proposer (see the module docstring)."""

    def __init__(self, datastore: Datastore, config: DresdConfig, device: torch.device | str = "cpu"):
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
                datastore.manifest.pca_dim, datastore.n_next, config.online_store_size, datastore.index.device,
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
        self.tokens_per_step = 1.0
        self.stats = DrafterStats()
        self._drafted: dict[object, np.ndarray] = {}  # request id -> cells of its last draft

    def token_cost(self, batch: int) -> float:
        """Share of a step that one more verified token per request costs, at this batch size."""
        if self.config.token_cost is not None:
            return self.config.token_cost
        # At batch 1 a step mostly reads weights; each request's extra token costs more as the batch fills
        # the compute, until one more token per request costs about a step.
        device = "cuda" if self.device_type == "cuda" else "cpu"
        return min(TOKEN_COST[device] * batch ** TOKEN_COST_EXPONENT[device], 1.0)

    def step(
        self,
        req_ids: Sequence[object],
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens: np.ndarray,
        token_ids: np.ndarray,
        verified: torch.Tensor,
        max_len: np.ndarray,
    ) -> list[list[int]]:
        """Drafts for one step of the batch.

        ``verified`` holds, request after request, the states of this step's verified positions:
        ``len(sampled_token_ids[i])`` rows each, the last being the state that produced request i's
        last token. ``token_ids[i, :num_tokens[i]]`` are its tokens so far; ``max_len[i]`` caps its draft.
        """
        batch = len(req_ids)
        counts = np.fromiter(map(len, sampled_token_ids), np.int64, batch)
        if verified.shape[0] != counts.sum():
            raise RuntimeError(f"captured {verified.shape[0]} verified states for {int(counts.sum())} sampled tokens")
        self._learn(req_ids, sampled_token_ids)
        # -1 never matches a stored token: partial prefills (no token sampled) get no draft.
        last_tokens = np.fromiter((t[-1] if t else -1 for t in sampled_token_ids), np.int64, batch)
        width = int(max_len.max(initial=0))
        threshold = self.token_cost(batch) * self.tokens_per_step if self.length_control else 0.0
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
        if self.online is not None and found is not None:
            owners = np.repeat(np.asarray(req_ids, dtype=object), counts)
            positions = np.repeat(num_tokens[:batch] - counts, counts) + _ranks(counts)
            self.online.add(found.keys, list(owners), positions, found.lists)
            self.stats.online_keys = len(self.online)
        if self.context is not None:
            start = time.perf_counter()
            found = self.context.candidates(req_ids, sampled_token_ids, num_tokens, token_ids, width)
            self.stats.context_s += time.perf_counter() - start
            bucket = np.searchsorted(CONTEXT_BUCKETS, found.match_len, "right")
            sources.append((CONTEXT, found.tokens, found.probs, bucket))
        if not sources or width <= 0:
            return [[] for _ in range(batch)]

        # Every source's chains are scored in one pass: row s * batch + i is source s's chain of request i.
        start = time.perf_counter()
        kinds = [source for source, *_ in sources]
        tokens = np.concatenate([t for _, t, _, _ in sources])
        cells = self.scorer.cells(
            np.repeat(kinds, batch),
            conditional(np.concatenate([c for _, _, c, _ in sources])),
            np.concatenate([b for *_, b in sources]),
        )
        present = tokens >= 0
        reach = np.cumprod(np.where(present, self.scorer.probability(cells), 0.0), axis=1)
        caps = np.tile(max_len, len(sources))
        lengths = np.minimum(cut(reach, threshold) if self.length_control else present.sum(axis=1), caps)
        gains = gain(reach, lengths, threshold).reshape(len(sources), batch)
        rows = pick(gains) * batch + np.arange(batch) if len(sources) > 1 else np.arange(batch)
        drafts = []
        for i, row in enumerate(rows.tolist()):
            n = int(lengths[row])
            drafts.append(tokens[row, :n].tolist())
            if n:
                self._drafted[req_ids[i]] = cells[row, :n]
                if kinds[row // batch] == DENSE:
                    self.stats.picked_dense += 1
                    self.stats.dense_tokens += n
                else:
                    self.stats.picked_context += 1
                    self.stats.context_tokens += n
        self.stats.score_s += time.perf_counter() - start
        return drafts

    def _learn(self, req_ids: Sequence[object], sampled_token_ids: Sequence[Sequence[int]]) -> None:
        """Feed back what vLLM accepted of each request's previous draft (its sampled tokens less one)."""
        drafted, self._drafted = self._drafted, {}
        for req_id, sampled in zip(req_ids, sampled_token_ids, strict=True):
            if not sampled:
                continue
            self.tokens_per_step += TOKENS_PER_STEP_RATE * (len(sampled) - self.tokens_per_step)
            cells = drafted.get(req_id)
            if cells is not None:
                self.scorer.update(cells, len(sampled) - 1)


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[i] - 1 for each i, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
