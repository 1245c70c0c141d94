"""How likely each draft position is to be accepted, and where a draft stops paying for itself.

A :class:`Scorer` turns a chain's per-position feature (a dense chain's conditional support, a context
chain's tree frequency) into the estimated chance that the position is accepted given the one before
was, from a table of cells (source, strength bucket, depth, feature bin) learnt from what vLLM
actually accepted. :func:`cut` and :func:`gain` price the chain against the cost of verifying it,
and :func:`pick` keeps the better source per request.
"""

from __future__ import annotations

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

    def update(self, cells: np.ndarray, accepted: int) -> None:
        """A draft over ``cells`` (in order) had its first ``accepted`` tokens accepted."""
        if not self.adapt:
            return
        reached = cells[: accepted + 1]
        np.add.at(self.trials, reached, 1.0)
        np.add.at(self.accepted, cells[:accepted], 1.0)

    def table(self) -> dict[str, list]:
        """The calibration table as nested lists [source][bucket][depth][bin] (for reports)."""
        shape = (len(SOURCES), BUCKETS, DEPTHS, BINS)
        return dict(
            probability=self.probability(np.arange(self.prior.size)).reshape(shape).round(4).tolist(),
            trials=self.trials.reshape(shape).astype(int).tolist(),
        )


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
