"""The online store's keys whose values are still arriving: a key's tokens follow it over the next steps."""

from __future__ import annotations

import numpy as np


class PendingValues:
    """Keys whose values are not complete yet, in flat arrays (one row a key), by owning request.

    A request is known by its int64 owner code (:attr:`~dresd_vllm.spec.request_rows.RequestRows.codes`),
    which no other request shares while it has pending keys, so that a step matches its batch against
    the pending keys with one sort and one search.
    """

    def __init__(self, n_next: int) -> None:
        self.slots = np.empty(0, dtype=np.int64)
        self.stamps = np.empty(0, dtype=np.int64)
        self.owners = np.empty(0, dtype=np.int64)  # the owning request's code
        self.positions = np.empty(0, dtype=np.int64)
        self._steps = np.arange(n_next + 1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.slots)

    def extend(self, slots: np.ndarray, stamps: np.ndarray, owners: np.ndarray, positions: np.ndarray) -> None:
        """Track keys in ``slots`` with insertion numbers ``stamps``, whose tokens start at ``positions``
        of the requests coded ``owners``."""
        self.slots, self.stamps, self.owners, self.positions = (
            np.concatenate(p) for p in zip((self.slots, self.stamps, self.owners, self.positions),
                                           (slots, stamps, owners, positions), strict=True)
        )  # fmt: skip

    def _keep(self, mask: np.ndarray) -> None:
        self.slots, self.stamps, self.owners, self.positions = (
            a[mask] for a in (self.slots, self.stamps, self.owners, self.positions)
        )

    def fill(
        self,
        values: np.ndarray,
        stamps: np.ndarray,
        codes: np.ndarray,
        token_ids: np.ndarray,
        num_tokens: np.ndarray,
    ) -> None:
        """Write the tokens now known into ``values`` (the store's, one row a slot) of the batch's pending keys.

        ``token_ids[i, :num_tokens[i]]`` are the tokens of the request coded ``codes[i]``; ``stamps`` the
        store's insertion number of each slot, which tells a key overwritten since. Requests no longer in
        the batch have finished: their keys keep the values they have and stop being tracked.
        """
        if not len(self):
            return
        codes = np.asarray(codes, dtype=np.int64)
        if not len(codes):
            self._keep(np.zeros(len(self), dtype=bool))
            return
        by_code = np.argsort(codes)
        rows = by_code[np.minimum(np.searchsorted(codes[by_code], self.owners), len(codes) - 1)]
        alive = codes[rows] == self.owners
        alive &= stamps[self.slots] == self.stamps  # not overwritten by newer keys since
        self._keep(alive)
        rows = rows[alive]
        n = np.asarray(num_tokens, dtype=np.int64)[rows]
        where = self.positions[:, None] + self._steps
        known = where < n[:, None]
        values[self.slots] = np.where(known, token_ids[rows[:, None], np.minimum(where, n[:, None] - 1)], -1)
        self._keep(~known[:, -1])
