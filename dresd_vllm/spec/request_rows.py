"""Request ids to rows of flat per-request arrays, kept across steps."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

# A row's owner code is row << GENERATION_BITS plus the number of requests the row has been handed to.
GENERATION_BITS = 32


class RequestRows:
    """Request ids -> rows of the drafter's per-request arrays, ``capacity`` (vLLM's max_num_seqs) rows.

    A request keeps its row from the first step it is in the batch to the first it is not (vLLM's input
    batch condenses its own rows as requests finish, so its row indices cannot be kept across steps).
    Work per request happens only when requests arrive or leave; a step with the same batch as the one
    before costs one list comparison.

    ``codes[row]`` names the row's current request among all the requests the drafter has seen: each
    time a row is handed to a new request its generation (the code's low bits) goes up, so state keyed
    by code (the online store's pending values) never carries over from a row's earlier request.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: dict[object, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._last_ids: list[object] = []
        self._last_rows = np.zeros(0, dtype=np.int64)
        self.tags = np.zeros(capacity, dtype=np.int64)  # the request's hash: the same request, the same tag
        self.codes = np.arange(capacity, dtype=np.int64) << GENERATION_BITS  # owner codes, generation 0: none yet
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
        self.codes[rows[self.arrived]] += 1  # a new generation: the row's earlier requests' codes no longer match
        self._last_ids, self._last_rows = ids, rows
        return rows
