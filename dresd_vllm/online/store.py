"""A dense store that learns from what the server verifies: SuffixDecoding's global cache, with hidden states.

Every verified position of every request adds one key: its projected post-norm state (the state
that produced the position's token, exactly as a datastore build records it) with the tokens that
followed it. Those tokens arrive over the following steps, so a key's value fills in as the request
advances; slots not known yet hold -1, which matches no token and ends a draft.

The keys are kept in coarse lists (the datastore's own IVF lists, or lists trained on its keys), each
a ring of ``list_size`` slots, and a search scans the ``probes`` lists nearest the query: its cost is
fixed at load, whether the store is empty or full. The store holds at most ``capacity`` keys, the
oldest evicted first; a list that fills before the store does drops its own oldest key.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dresd_vllm.index.host_copy import HostCopy
from dresd_vllm.index.torch_search import WORKSPACE_BYTES, cat_chunks, chunk_rows, exact_search
from dresd_vllm.online.values import PendingValues

# Slots one query scans at most (probes x list_size): a few percent of a full store.
SCAN_SLOTS = 1024
# Ring slots per list as a multiple of an even share of the capacity, for lists that fill faster.
LIST_SLACK = 2


def online_lists(capacity: int) -> int:
    """Coarse lists for a store of ``capacity`` keys over a datastore without its own: ~4 sqrt(capacity),
    a power of two (the FAISS guideline the datastore build follows too)."""
    return 1 << max(0, round(math.log2(4 * math.sqrt(capacity))))


class OnlineStore:
    """At most ``capacity`` keys of ``dim`` with values of ``n_next + 1`` tokens, oldest evicted first.

    ``coarse`` is ``(weight [dim, nlist], bias [nlist])`` on ``device`` that scores a key's lists
    (:meth:`~dresd_vllm.index.search.SearchIndex.coarse_map`); None keeps one list, an exact search of the
    whole store (for small stores). Each list is a ring of ``list_size`` slots (by default
    :data:`LIST_SLACK` times an even share of the capacity); a search scans ``probes`` lists (by
    default as many as make :data:`SCAN_SLOTS` slots), in chunks of queries whose temporaries stay
    within ``workspace_bytes``.
    """

    def __init__(
        self,
        dim: int,
        n_next: int,
        capacity: int,
        device: torch.device | str = "cpu",
        coarse: tuple[torch.Tensor, torch.Tensor] | None = None,
        list_size: int | None = None,
        probes: int | None = None,
        workspace_bytes: int = WORKSPACE_BYTES,
    ):
        if capacity < 1:
            raise ValueError(f"online store capacity must be >= 1, got {capacity}")
        device = torch.device(device)
        # fp32 on the CPU, where fp16 GEMM is slow; the keys are fp16-rounded unit vectors either way.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.capacity, self.n_next, self.device = capacity, n_next, device
        if coarse is None:
            coarse = (torch.zeros((dim, 1), device=device), torch.zeros(1, device=device))
        self._weight, self._bias = (t.to(device, torch.float32) for t in coarse)
        self.nlist = self._weight.shape[1]
        even = math.ceil(capacity / self.nlist)
        self.list_size = list_size or min(capacity, even if self.nlist == 1 else LIST_SLACK * even)
        self.probes = min(self.nlist, probes or max(1, SCAN_SLOTS // self.list_size))
        slots = self.nlist * self.list_size
        self.keys = torch.zeros((slots, dim), dtype=dtype, device=device)
        self.values = np.full((slots, n_next + 1), -1, dtype=np.int32)
        self.stamps = np.full(slots, -1, dtype=np.int64)  # insertion number of the key in each slot, -1: empty
        self._stamps = torch.full((slots,), -1, dtype=torch.long, device=device)  # the same, for search
        self._heads = np.zeros(self.nlist, dtype=np.int64)  # next ring position of each list
        self._slot_of = np.zeros(capacity, dtype=np.int64)  # slot of the key with insertion number s, at s % capacity
        self.added = 0  # keys ever added
        self._size = 0
        self._pending = PendingValues(n_next)
        self._ring = torch.arange(self.list_size, device=device)
        per_query = self.probes * self.list_size * (dim * self.keys.element_size() + 32)
        self._rows = chunk_rows(per_query, workspace_bytes)
        self._copy = HostCopy()

    def __len__(self) -> int:
        return self._size

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        """Each key's list, int64 ``[R]`` on the device."""
        return torch.addmm(self._bias, keys.to(self.device, torch.float32), self._weight).argmax(dim=1)

    def add(
        self,
        keys: torch.Tensor,
        owners: np.ndarray,
        positions: np.ndarray,
        lists: np.ndarray | None = None,
    ) -> None:
        """Add ``keys [R, dim]``; row r belongs to the request coded ``owners[r]`` (int64 [R], its
        :attr:`~dresd_vllm.spec.request_rows.RequestRows.codes`) and produced its token at ``positions[r]``.

        Values are left unknown (-1) until :meth:`fill` sees the request's tokens. ``lists`` are the
        keys' lists when the caller already copied :meth:`assign`'s result back (else one copy here).
        """
        if keys.shape[0] == 0:
            return
        if lists is None:
            lists = self._copy([self.assign(keys)])[0]
        slots, stamps, kept = self._place(np.asarray(lists, dtype=np.int64))
        self._write(keys, slots, stamps, kept)
        self.values[slots] = -1
        owners, positions = (np.asarray(a, dtype=np.int64)[kept] for a in (owners, positions))
        self._pending.extend(slots, stamps, owners, positions)

    def add_complete(self, keys: torch.Tensor, values: np.ndarray) -> None:
        """Add ``keys [R, dim]`` whose values ``int32 [R, n_next + 1]`` are known (a reloaded spool)."""
        if keys.shape[0] == 0:
            return
        if values.shape != (keys.shape[0], self.n_next + 1):
            raise ValueError(f"values must be [{keys.shape[0]}, {self.n_next + 1}], got {values.shape}")
        lists = self._copy([self.assign(keys)])[0]
        slots, stamps, kept = self._place(lists)
        self._write(keys, slots, stamps, kept)
        self.values[slots] = values[kept]

    def _place(self, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ring slots and insertion numbers for keys of ``lists``, in order; ``kept`` the rows that get one.

        A list given more keys than its ring keeps the newest; so does the store past its capacity.
        """
        count = len(lists)
        stamps = self.added + np.arange(count, dtype=np.int64)
        self.added += count
        order = np.argsort(lists, kind="stable")
        sorted_lists = lists[order]
        first = np.searchsorted(sorted_lists, sorted_lists, "left")
        per_list = np.bincount(lists, minlength=self.nlist)
        rank = np.empty(count, dtype=np.int64)
        rank[order] = np.arange(count) - first  # the key's number among this call's keys of its list
        kept = (rank >= per_list[lists] - self.list_size) & (stamps >= self.added - self.capacity)
        slots = lists * self.list_size + (self._heads[lists] + rank) % self.list_size
        self._heads = (self._heads + per_list) % self.list_size
        return slots[kept], stamps[kept], kept

    def _write(self, keys: torch.Tensor, slots: np.ndarray, stamps: np.ndarray, kept: np.ndarray) -> None:
        self._count_out(slots, stamps, self.added - len(kept))
        self.stamps[slots] = stamps
        self._slot_of[stamps % self.capacity] = slots
        index = torch.from_numpy(slots).to(self.device, non_blocking=True)
        rows = keys if kept.all() else keys[torch.from_numpy(np.flatnonzero(kept)).to(keys.device, non_blocking=True)]
        self.keys.index_copy_(0, index, rows.to(self.device, self.keys.dtype))
        self._stamps.index_copy_(0, index, torch.from_numpy(stamps).to(self.device, non_blocking=True))

    def _count_out(self, slots: np.ndarray, stamps: np.ndarray, before: int) -> None:
        """Keep ``len`` current as keys ``stamps`` go into ``slots`` after ``before`` keys: keys past the
        capacity, or overwritten in their list, leave."""
        old_floor = max(before - self.capacity, 0)
        floor = max(self.added - self.capacity, 0)
        # Live keys whose insertion number fell below the floor (unless a list overwrote them already).
        gone = np.arange(old_floor, min(floor, before), dtype=np.int64)
        evicted = int(np.count_nonzero(self.stamps[self._slot_of[gone % self.capacity]] == gone))
        overwritten = int(np.count_nonzero(self.stamps[slots] >= floor))  # live keys a list ring wrote over
        self._size += len(stamps) - evicted - overwritten

    def fill(self, codes: np.ndarray, token_ids: np.ndarray, num_tokens: np.ndarray) -> None:
        """Write the tokens now known into the values of the batch's pending keys.

        ``token_ids[i, :num_tokens[i]]`` are the tokens of the request coded ``codes[i]`` (int64 [B], as
        given to :meth:`add`). Requests that are no longer in the batch have finished: their keys keep
        the values they have.
        """
        self._pending.fill(self.values, self.stamps, codes, token_ids, num_tokens)

    def search_tensors(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores float32 [B, k], slots int64 [B, k])`` on the store's device (-inf / -1 padded).

        The values of a slot are ``values[slot]`` (:meth:`values_of`), read after the copy back.
        """
        q = queries.to(self.device, torch.float32)
        floor = max(self.added - self.capacity, 0)  # older keys are evicted; empty slots hold -1
        results = [self._search(q[s : s + self._rows], k, floor) for s in range(0, q.shape[0], self._rows)]
        return cat_chunks(results, q.shape[0], k, self.device)

    def _search(self, q: torch.Tensor, k: int, floor: int) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.topk(torch.addmm(self._bias, q, self._weight), self.probes, dim=1).indices  # [b, P]
        slots = (probe[:, :, None] * self.list_size + self._ring).reshape(q.shape[0], -1)  # [b, P * L]
        dim = self.keys.shape[1]
        # index_select copies whole lists (contiguous rows): about twice as fast as advanced indexing.
        lists = probe.reshape(-1)
        keys = self.keys.view(self.nlist, -1).index_select(0, lists).view(q.shape[0], -1, dim)
        live = self._stamps.view(self.nlist, -1).index_select(0, lists).view(q.shape[0], -1) >= floor
        scores, pos = exact_search(q, keys, k, live)
        return scores, slots.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, -1)

    def values_of(self, slots: np.ndarray) -> np.ndarray:
        """Values ``int32 [..., n_next + 1]`` of ``slots [...]``; rows of -1 where a slot is -1."""
        out = self.values[np.maximum(slots, 0)]
        out[slots < 0] = -1
        return out

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` keys by inner product for ``queries [B, dim]``, on the host.

        Returns ``(scores float32 [B, k], values int32 [B, k, n_next + 1])``, best first; missing
        hits have score -inf and values -1.
        """
        scores, slots = self._copy(self.search_tensors(queries, k))
        return scores, self.values_of(slots)
