"""What a drafter learns after each step: how much of each draft vLLM accepted, and what the step cost."""

from __future__ import annotations

import numpy as np

from dresd_vllm.spec.scoring import Scorer, TokenPrice

# The running mean of tokens per request and step adapts with this rate.
TOKENS_PER_STEP_RATE = 0.02
# A gap between two steps longer than this is the engine idling between requests, not a step.
IDLE_S = 1.0


class Feedback:
    """Each request's last draft (its scorer cells and length) in rows of ``capacity``, fed back a step later.

    The scorer learns what vLLM accepted of each draft; the token price learns from the time of the
    engine step that verified them; ``tokens_per_step`` is the running mean of tokens per request and step.
    """

    def __init__(self, scorer: Scorer, price: TokenPrice, capacity: int):
        self.scorer, self.price = scorer, price
        self.tokens_per_step = 1.0
        # Per row: the cells of the request's last draft and its length (0: none), and its last step's
        # sampled tokens (0: a partial prefill, or new).
        self._cells = np.zeros((capacity, 0), dtype=np.int64)
        self._draft_len = np.zeros(capacity, dtype=np.int64)
        self._sampled = np.zeros(capacity, dtype=np.int64)
        self._last_start: float | None = None

    def learn(self, rows: np.ndarray, counts: np.ndarray, now: float | None, arrived: int) -> None:
        """Feed back what vLLM accepted of each request's previous draft (its ``counts`` sampled tokens less one),
        and the time of the engine step that verified those drafts (``now``: its hand-over; None: no clock).
        ``arrived`` requests are new to the batch."""
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
            prefill = arrived or not done.all() or np.any(self._sampled[rows] == 0)
            if last is not None and not prefill and now - last < IDLE_S:
                self.price.observe(len(rows), len(rows) + int(drafted.sum()), now - last)
        self._sampled[rows] = counts

    def record(self, rows: np.ndarray, cells: np.ndarray, lengths: np.ndarray) -> None:
        """Remember the drafts just made: ``cells [B, W]`` and ``lengths [B]`` of the requests in ``rows``."""
        width = cells.shape[1]
        if width > self._cells.shape[1]:
            self._cells = np.zeros((len(self._draft_len), width), dtype=np.int64)
        self._cells[rows, :width] = cells
        self._draft_len[rows] = lengths
