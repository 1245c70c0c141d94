"""The dense source's merge: the survivors' continuations as one chain per request, along their prefix trie.

vLLM verifies one chain per request, so the paper's top-10 drafts are merged into one: the survivors'
continuations form a prefix trie whose nodes weigh the similarity of the survivors under them, and the
draft follows the heaviest branch. The merge is vectorised over the batch (no trie objects, no dict per key).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Survivors weigh their cosine similarity, floored so that a survivor with a
# negative similarity still counts and the total weight is never zero.
MIN_WEIGHT = 1e-3


@dataclasses.dataclass
class DenseCandidates:
    """One merged chain per request and what it rests on."""

    tokens: np.ndarray  # int64 [B, W]
    support: np.ndarray  # float32 [B, W]: share of the survivors' weight still on the chain at depth j; 0 = none
    survivors: np.ndarray  # int64 [B]
    drafts: np.ndarray  # int32 [B, C, W]: every merged survivor's continuation, best first
    valid: np.ndarray  # bool [B, C]

    def lengths(self, min_support: float) -> np.ndarray:
        """Chain lengths where the support stays >= ``min_support`` (and > 0)."""
        # The relative slack keeps a branch that every survivor shares at exactly 1.0 support.
        enough = (self.support >= min_support * (1 - 1e-6)) & (self.support > 0)
        return np.logical_and.accumulate(enough, axis=1).sum(axis=1)


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
    total = np.maximum(weights.sum(axis=1, keepdims=True), MIN_WEIGHT)
    support = branch_weight[np.arange(batch), winner] / total  # non-increasing along the chain
    return chains, np.where(valid.any(axis=1, keepdims=True), support, 0.0).astype(np.float32)
