"""The online store's keys whose values are still arriving: a key's tokens follow it over the next steps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PendingValues:
    """Keys whose values are not complete yet, in flat arrays (one row a key), by owning request.

    A request is known by a small integer code while it has pending keys, so that a step matches its
    batch against the pending keys with one sort and one search.
    """

    def __init__(self, n_next: int) -> None:
        self.slots = np.empty(0, dtype=np.int64)
        self.stamps = np.empty(0, dtype=np.int64)
        self.owners = np.empty(0, dtype=np.int64)  # the owning request's code
        self.positions = np.empty(0, dtype=np.int64)
        self._codes: dict[object, int] = {}  # request id -> code, for requests with pending keys
        self._next_code = 0
        self._steps = np.arange(n_next + 1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.slots)

    def codes(self, owners: Sequence[object]) -> np.ndarray:
        """The code of each of ``owners`` (request ids), new ones numbered on first sight."""
        return np.fromiter(map(self._code, owners), np.int64, len(owners))

    def _code(self, owner: object) -> int:
        code = self._codes.get(owner)
        if code is None:
            code = self._codes[owner] = self._next_code
            self._next_code += 1
        return code

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
        req_ids: Sequence[object],
        token_ids: np.ndarray,
        num_tokens: np.ndarray,
    ) -> None:
        """Write the tokens now known into ``values`` (the store's, one row a slot) of the batch's pending keys.

        ``token_ids[i, :num_tokens[i]]`` are request ``req_ids[i]``'s tokens; ``stamps`` the store's
        insertion number of each slot, which tells a key overwritten since. Requests no longer in the
        batch have finished: their keys keep the values they have and stop being tracked.
        """
        codes = np.fromiter((self._codes.get(r, -1) for r in req_ids), np.int64, len(req_ids))
        self._codes = {r: int(c) for r, c in zip(req_ids, codes, strict=True) if c >= 0}
        if not len(self):
            return
        by_code = np.argsort(codes)
        at = np.minimum(np.searchsorted(codes[by_code], self.owners), len(codes) - 1)
        rows = by_code[at] if len(codes) else np.zeros(len(self), dtype=np.int64)
        alive = (codes[rows] == self.owners) if len(codes) else np.zeros(len(self), dtype=bool)
        alive &= stamps[self.slots] == self.stamps  # not overwritten by newer keys since
        self._keep(alive)
        rows = rows[alive]
        n = np.asarray(num_tokens, dtype=np.int64)[rows]
        where = self.positions[:, None] + self._steps
        known = where < n[:, None]
        values[self.slots] = np.where(known, token_ids[rows[:, None], np.minimum(where, n[:, None] - 1)], -1)
        self._keep(~known[:, -1])
