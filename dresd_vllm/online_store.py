"""A dense store that learns from what the server verifies: SuffixDecoding's global cache, with hidden states.

Every verified position of every request adds one key: its projected post-norm state (the state
that produced the position's token, exactly as a datastore build records it) with the tokens that
followed it. Those tokens arrive over the following steps, so a key's value fills in as the request
advances; slots not known yet hold -1, which matches no token and ends a draft. The store is a ring:
at ``capacity`` keys the oldest is overwritten. Search is exact (one GEMM + top-k on the keys' device).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class OnlineStore:
    """At most ``capacity`` keys ``[capacity, dim]`` with values of ``n_next + 1`` tokens, oldest evicted first."""

    def __init__(self, dim: int, n_next: int, capacity: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"online store capacity must be >= 1, got {capacity}")
        device = torch.device(device)
        # fp32 on the CPU, where fp16 GEMM is slow; the keys are fp16-rounded unit vectors either way.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.capacity = capacity
        self.n_next = n_next
        self.keys = torch.zeros((capacity, dim), dtype=dtype, device=device)
        self.values = np.full((capacity, n_next + 1), -1, dtype=np.int32)
        self.stamps = np.full(capacity, -1, dtype=np.int64)  # insertion number of the key in each slot
        self.added = 0  # keys ever added; the next goes to slot added % capacity
        # request id -> (slots, stamps, positions) of its keys whose values are not complete yet
        self._pending: dict[object, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._steps = np.arange(n_next + 1, dtype=np.int64)

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    def add(self, keys: torch.Tensor, owners: Sequence[object], positions: np.ndarray) -> None:
        """Add ``keys [R, dim]``; row r belongs to request ``owners[r]`` and produced its token at ``positions[r]``.

        Values are left unknown (-1) until :meth:`fill` sees the request's tokens.
        """
        count = keys.shape[0]
        if count == 0:
            return
        if count > self.capacity:  # only the newest capacity keys would survive anyway
            keys, owners, positions = keys[-self.capacity :], owners[-self.capacity :], positions[-self.capacity :]
            self.added += count - self.capacity
            count = self.capacity
        stamps = self.added + np.arange(count, dtype=np.int64)
        slots = stamps % self.capacity
        self.keys[torch.from_numpy(slots).to(self.keys.device)] = keys.to(self.keys.device, self.keys.dtype)
        self.values[slots] = -1
        self.stamps[slots] = stamps
        self.added += count
        owners_arr = np.asarray(owners, dtype=object)
        positions = np.asarray(positions, dtype=np.int64)
        for owner in dict.fromkeys(owners):
            mine = owners_arr == owner
            new = (slots[mine], stamps[mine], positions[mine])
            old = self._pending.get(owner)
            self._pending[owner] = new if old is None else tuple(np.concatenate(p) for p in zip(old, new, strict=True))

    def fill(self, req_ids: Sequence[object], token_ids: np.ndarray, num_tokens: np.ndarray) -> None:
        """Write the tokens now known into the values of the batch's pending keys.

        ``token_ids[i, :num_tokens[i]]`` are request ``req_ids[i]``'s tokens. Requests that are no
        longer in the batch have finished: their keys keep the values they have.
        """
        batch = {r: i for i, r in enumerate(req_ids)}
        self._pending = {r: p for r, p in self._pending.items() if r in batch}
        for owner, (slots, stamps, positions) in list(self._pending.items()):
            row, n = batch[owner], int(num_tokens[batch[owner]])
            alive = self.stamps[slots] == stamps  # not overwritten by newer keys since
            slots, stamps, positions = slots[alive], stamps[alive], positions[alive]
            where = positions[:, None] + self._steps
            known = where < n
            self.values[slots] = np.where(known, token_ids[row, np.minimum(where, n - 1)], -1)
            open_ = ~known[:, -1]
            if open_.any():
                self._pending[owner] = (slots[open_], stamps[open_], positions[open_])
            else:
                del self._pending[owner]

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` keys by inner product for ``queries [B, dim]``.

        Returns ``(scores float32 [B, k], values int32 [B, k, n_next + 1])``, best first; missing
        hits have score -inf and values -1.
        """
        batch, size = queries.shape[0], len(self)
        scores = np.full((batch, k), -np.inf, dtype=np.float32)
        values = np.full((batch, k, self.n_next + 1), -1, dtype=np.int32)
        found = min(k, size)
        if found == 0:
            return scores, values
        sims = queries.to(self.keys.device, self.keys.dtype) @ self.keys[:size].T
        top, idx = torch.topk(sims, found, dim=1)
        scores[:, :found] = top.float().cpu().numpy()
        values[:, :found] = self.values[idx.cpu().numpy()]
        return scores, values
