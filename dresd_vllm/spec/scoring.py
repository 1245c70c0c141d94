"""How likely each draft position is to be accepted, and where a draft stops paying for itself.

A :class:`Scorer` turns a chain's per-position feature (a dense chain's conditional support, a context
chain's tree frequency) into the estimated chance that the position is accepted given the one before
was, from a table of cells (source, strength bucket, depth, feature bin) learnt from what vLLM
actually accepted. :func:`cut` and :func:`gain` price the chain against the cost of verifying it,
at the :class:`TokenPrice` fitted from the engine's own step times, and :func:`pick` keeps the better
source per request.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SOURCES = ("dense", "context")
DENSE, CONTEXT = 0, 1
BINS = 10  # feature bins of width 0.1
DEPTHS = 4  # draft positions 0, 1, 2, 3+
# Strength buckets: survivors of the first-token filter (dense), tokens matched (context).
DENSE_BUCKETS = np.array([2, 4, 7])  # 1, 2-3, 4-6, 7+ survivors
CONTEXT_BUCKETS = np.array([3, 6, 12])  # 1-2, 3-5, 6-11, 12+ tokens matched
BUCKETS = 4
# Weight of the prior (the raw feature) in tokens-worth of evidence per cell.
PRIOR_WEIGHT = 8.0

# The prior of the token price: what one more verified draft token per request adds to a step's time, as a
# share of the step: TOKEN_COST * batch ** TOKEN_COST_EXPONENT, at most 1. Fitted to this project's CPU
# machine, where a step at batch 1 is memory-bound and at batch 16 compute-bound, its time proportional to
# the tokens it verifies (the measurements: CHANGELOG.md). The GPU's is a guess for a step that stays
# memory-bound. :class:`TokenPrice` corrects both from the step times it sees.
TOKEN_COST = {"cpu": 0.04, "cuda": 0.004}
TOKEN_COST_EXPONENT = {"cpu": 1.15, "cuda": 1.0}
# The price fit forgets with this horizon, in steps of one batch-size bucket.
PRICE_HORIZON = 1000
# The prior weighs as this many steps whose verified tokens vary by one token: about a hundred steps of a
# batch that drafts outweigh it, steps that differ only in their batch size take many hundreds.
PRICE_PRIOR_STEPS = 1000
# The fitted price is never below this share of a step: noise can make a slope negative, a draft token is
# never free.
PRICE_FLOOR = 0.001
# A step slower than this multiple of its bucket's mean is a stall (another process, a collection), not a price.
PRICE_OUTLIER = 4.0
# Batch-size buckets 1, 2, 3-4, 5-8, ... up to 2**20 requests.
PRICE_BUCKETS = 21


class Scorer:
    """Estimated acceptance per draft position, calibrated online from what each request accepted."""

    def __init__(self, adapt: bool = True):
        self.adapt = adapt
        shape = (len(SOURCES), BUCKETS, DEPTHS, BINS)
        centres = (np.arange(BINS, dtype=np.float64) + 0.5) / BINS
        self.prior = np.broadcast_to(centres, shape).reshape(-1).copy()
        self.trials = np.zeros(self.prior.shape)
        self.accepted = np.zeros(self.prior.shape)

    def cells(self, source: int | np.ndarray, conditional: np.ndarray, bucket: np.ndarray) -> np.ndarray:
        """Flat cell index ``[B, W]`` of each position: (source (one, or one per row), bucket [B], depth, bin)."""
        width = conditional.shape[1]
        depth = np.minimum(np.arange(width), DEPTHS - 1)
        bins = np.clip((conditional * BINS).astype(np.int64), 0, BINS - 1)
        return ((source * BUCKETS + bucket)[:, None] * DEPTHS + depth) * BINS + bins

    def probability(self, cells: np.ndarray) -> np.ndarray:
        """P(accepted | the position before was) of each cell."""
        return (self.accepted[cells] + PRIOR_WEIGHT * self.prior[cells]) / (self.trials[cells] + PRIOR_WEIGHT)

    def best(self) -> float:
        """The highest P(accepted) of any cell: no chain's chance of reaching a position can exceed it."""
        return float(self.probability(np.arange(self.prior.size)).max())

    def update(self, cells: np.ndarray, lengths: np.ndarray, accepted: np.ndarray) -> None:
        """Drafts over ``cells [N, W]`` (row i: its first ``lengths[i]`` cells, in order) had their first
        ``accepted[i]`` tokens accepted: one ``bincount`` per counter for the whole batch."""
        if not self.adapt or cells.shape[0] == 0:
            return
        depth = np.arange(cells.shape[1])
        drafted = depth < lengths[:, None]
        reached = drafted & (depth <= accepted[:, None])  # the rejected token was tried too
        self.trials += np.bincount(cells[reached], minlength=self.trials.size)
        self.accepted += np.bincount(cells[drafted & (depth < accepted[:, None])], minlength=self.accepted.size)


class TokenPrice:
    """The share of an engine step that one more verified token per request adds, at each batch size.

    Fitted online from the engine's steps: per batch-size bucket (1, 2, 3-4, 5-8, ...), a
    least-squares line of step time against the tokens the step verified (a token per request plus
    its draft), forgetting with :data:`PRICE_HORIZON`. The fit scales the prior curve
    ``coef * batch ** exponent`` per bucket: its slope, as a share of the bucket's mean step, over
    the prior's at the bucket's mean batch. The prior weighs as :data:`PRICE_PRIOR_STEPS` steps
    whose tokens vary by one, so a bucket whose steps all verify the same number of tokens (a full
    batch that stands down) keeps the prior's price; where the batch size varies, a request's token
    prices a draft token. ``fixed`` (the user's token_cost) is the price at every batch size; the fit
    goes on and :meth:`fitted` reports it.
    """

    def __init__(self, coef: float, exponent: float, fixed: float | None = None):
        self.coef = coef
        self.exponent = exponent
        self.fixed = fixed
        # Per bucket, decayed sums: weight, batch, tokens, seconds, tokens^2, tokens*seconds.
        self.sums = np.zeros((6, PRICE_BUCKETS))
        self.steps = 0  # steps observed

    @staticmethod
    def bucket(batch: int) -> int:
        """The batch-size bucket of ``batch``: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ..."""
        return min(int(batch - 1).bit_length(), PRICE_BUCKETS - 1)

    def prior(self, batch: float) -> float:
        """Today's constants' price at ``batch``, at most 1."""
        return min(self.coef * batch**self.exponent, 1.0)

    def observe(self, batch: int, tokens: int, seconds: float) -> None:
        """One engine step of ``batch`` requests verified ``tokens`` tokens in ``seconds``."""
        sums = self.sums[:, self.bucket(batch)]
        if sums[0] >= 1.0 and seconds > PRICE_OUTLIER * sums[3] / sums[0]:
            return
        sums *= 1.0 - 1.0 / PRICE_HORIZON
        sums += (1.0, batch, tokens, seconds, tokens * tokens, tokens * seconds)
        self.steps += 1

    def fitted(self, batch: int) -> float:
        """The fitted price at ``batch`` (the prior's where no step of its bucket was seen), at most 1."""
        weight, batches, tokens, seconds, tokens2, cross = self.sums[:, self.bucket(batch)]
        if weight <= 0.0 or seconds <= 0.0:
            return self.prior(batch)
        mean_batch, mean_tokens, mean_s = batches / weight, tokens / weight, seconds / weight
        spread = max(tokens2 / weight - mean_tokens**2, 0.0)
        covariance = cross / weight - mean_tokens * mean_s
        # Seconds per token, as the prior prices them at this bucket's mean batch and step time.
        prior_slope = self.coef * mean_batch ** (self.exponent - 1.0) * mean_s
        slope = (weight * covariance + PRICE_PRIOR_STEPS * prior_slope) / (weight * spread + PRICE_PRIOR_STEPS)
        price = self.coef * batch**self.exponent * slope / prior_slope
        return float(np.clip(price, PRICE_FLOOR, 1.0))

    def __call__(self, batch: int) -> float:
        """The price at ``batch`` that the cut uses: ``fixed``, or the fitted one."""
        return self.fixed if self.fixed is not None else self.fitted(batch)


def conditional(cumulative: np.ndarray) -> np.ndarray:
    """Per-position ratios of a non-increasing chain feature ``[B, W]`` (the chance given the position before)."""
    before = np.concatenate([np.ones((cumulative.shape[0], 1), np.float32), cumulative[:, :-1]], axis=1)
    return np.divide(cumulative, before, out=np.zeros_like(cumulative), where=before > 0)


def cut(reach: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """Lengths ``[B]``: the longest prefix whose chance of being reached and accepted is >= ``threshold``."""
    return np.logical_and.accumulate(reach >= np.reshape(threshold, (-1, 1)), axis=1).sum(axis=1)


def gain(reach: np.ndarray, lengths: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """Expected accepted tokens of each cut chain, less the cost of verifying them (in tokens)."""
    kept = np.arange(reach.shape[1]) < lengths[:, None]
    return np.where(kept, reach - np.reshape(threshold, (-1, 1)), 0.0).sum(axis=1)


def pick(gains: np.ndarray) -> np.ndarray:
    """Source per request ``[B]`` from ``gains [S, B]``: the largest, ties to the first (dense)."""
    return gains.argmax(axis=0)


class Chains(NamedTuple):
    """One source's chain per request, before scoring."""

    source: int  # DENSE or CONTEXT
    tokens: np.ndarray  # int64 [B, W], -1 past the chain's end
    feature: np.ndarray  # float32 [B, W]: the cumulative feature (dense support, context path frequency)
    bucket: np.ndarray  # int64 [B]: the source's strength bucket (survivors, match length)


def price_chains(
    scorer: Scorer, sources: list[Chains], max_len: np.ndarray, threshold: float, length_control: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score every source's chains in one pass, cut them at ``threshold`` and pick one per request.

    Without ``length_control`` a chain keeps every token it has. Returns the chosen chains'
    ``(source, tokens, cells, lengths)``, one row per request; no chain is longer than ``max_len``.
    """
    batch = len(sources[0].tokens)
    # Row s * batch + i is source s's chain of request i.
    kinds = np.repeat([c.source for c in sources], batch)
    tokens = np.concatenate([c.tokens for c in sources])
    features = conditional(np.concatenate([c.feature for c in sources]))
    cells = scorer.cells(kinds, features, np.concatenate([c.bucket for c in sources]))
    present = tokens >= 0
    reach = np.cumprod(np.where(present, scorer.probability(cells), 0.0), axis=1)
    # A chain ends at its first missing token, whatever the threshold (a price of 0 keeps every reach).
    caps = np.minimum(np.tile(max_len, len(sources)), np.logical_and.accumulate(present, axis=1).sum(axis=1))
    lengths = np.minimum(cut(reach, threshold) if length_control else present.sum(axis=1), caps)
    gains = gain(reach, lengths, threshold).reshape(len(sources), batch)
    chosen = pick(gains) * batch + np.arange(batch) if len(sources) > 1 else np.arange(batch)
    return kinds[chosen], tokens[chosen], cells[chosen], lengths[chosen]
