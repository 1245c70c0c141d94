"""The online store's lists: a fixed search cost, global oldest-first eviction, vectorised bookkeeping."""

import numpy as np
import pytest
import torch

from dresd_vllm.online.store import OnlineStore, online_lists
from dresd_vllm.spec.request_rows import RequestRows

DIM, N_NEXT = 16, 3


def unit_keys(n: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, DIM))).float(), dim=1)


def coarse(nlist: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return unit_keys(nlist, rng).T.contiguous(), torch.zeros(nlist)


class Reference:
    """The store's semantics written plainly: a global ring of ``capacity`` keys, values filled per request."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[np.ndarray] = []
        self.pending: dict[object, list[tuple[int, int]]] = {}

    def add(self, keys, owners, positions):
        for key, owner, position in zip(keys, owners, positions, strict=True):
            self.pending.setdefault(owner, []).append((len(self.keys), int(position)))
            self.keys.append(key)
            self.values.append(np.full(N_NEXT + 1, -1, dtype=np.int32))

    def fill(self, req_ids, token_ids, num_tokens):
        self.pending = {r: p for r, p in self.pending.items() if r in req_ids}
        for i, r in enumerate(req_ids):
            for stamp, position in self.pending.get(r, []):
                for j in range(N_NEXT + 1):
                    if position + j < num_tokens[i]:
                        self.values[stamp][j] = token_ids[i, position + j]

    def live(self) -> range:
        return range(max(0, len(self.keys) - self.capacity), len(self.keys))


def run_traffic(store: OnlineStore, reference: Reference, steps: int, rng: np.random.Generator) -> None:
    """Requests that come and go, a few verified positions each per step; the store knows them by the owner
    codes of :class:`RequestRows` (a finished request's row goes to the next one), the reference by id."""
    active = {f"r{i}": 0 for i in range(4)}
    request_rows = RequestRows(4)
    tokens = rng.integers(0, 50, size=(8, 400))
    next_id = 4
    for _ in range(steps):
        if rng.random() < 0.3:  # one request finishes, another starts
            del active[rng.choice(sorted(active))]
            active[f"r{next_id}"] = 0
            next_id += 1
        req_ids = list(active)
        counts = rng.integers(1, 4, size=len(req_ids))
        for r, c in zip(req_ids, counts, strict=True):
            active[r] += int(c)
        num_tokens = np.array([active[r] for r in req_ids])
        rows = np.array([int(r[1:]) % 8 for r in req_ids])  # each request's tokens
        codes = request_rows.codes[request_rows(req_ids)]
        store.fill(codes, tokens[rows], num_tokens)
        reference.fill(req_ids, tokens[rows], num_tokens)
        positions = np.concatenate([np.arange(n - c, n) for n, c in zip(num_tokens, counts, strict=True)])
        keys = unit_keys(len(positions), rng)
        store.add(keys, np.repeat(codes, counts), positions)
        reference.add(keys, np.repeat(req_ids, counts).tolist(), positions)


def test_one_list_is_the_exact_ring_and_fills_like_the_reference():
    rng = np.random.default_rng(0)
    store, reference = OnlineStore(DIM, N_NEXT, capacity=50), Reference(50)
    run_traffic(store, reference, 60, rng)
    assert store.nlist == 1 and store.added == len(reference.keys) > 50 and len(store) == 50
    queries = unit_keys(5, rng)
    scores, values = store.search(queries, k=10)
    live = list(reference.live())
    sims = queries @ torch.stack([reference.keys[i] for i in live]).T
    top, at = torch.topk(sims, 10)
    np.testing.assert_allclose(scores, top.numpy(), atol=1e-6)
    expected = np.stack([[reference.values[live[j]] for j in row] for row in at.tolist()])
    np.testing.assert_array_equal(values, expected)


def test_a_row_handed_to_a_new_request_does_not_fill_the_earlier_requests_keys():
    request_rows, store = RequestRows(1), OnlineStore(DIM, N_NEXT, capacity=8)
    key = unit_keys(1, np.random.default_rng(6))
    a = request_rows(["a"])
    store.add(key, request_rows.codes[a], np.array([2]))  # the state that produced a's token 2
    store.fill(request_rows.codes[a], np.array([[10, 11, 12]]), np.array([3]))
    b = request_rows(["b"])  # a finished; b gets its row, with tokens enough to fill a's key
    assert b.tolist() == a.tolist() and len(store._pending) == 1
    store.fill(request_rows.codes[b], np.array([[20, 21, 22, 23, 24, 25]]), np.array([6]))
    _, values = store.search(key, k=1)
    assert values[0, 0].tolist() == [12, -1, -1, -1] and not store._pending  # not b's 22, 23, 24, 25


def test_lists_scan_a_fixed_share_and_find_what_a_full_scan_of_their_lists_finds():
    rng = np.random.default_rng(1)
    capacity, nlist = 400, 16
    store = OnlineStore(DIM, N_NEXT, capacity, coarse=coarse(nlist, rng), probes=4)
    reference = Reference(capacity)
    assert store.list_size == 2 * capacity // nlist and store.probes == 4
    run_traffic(store, reference, 300, rng)
    assert len(reference.keys) > 2 * capacity  # full, and turned over
    # Live keys: the newest `capacity`, less those their list dropped; len counts exactly those.
    live = store.stamps >= store.added - capacity
    assert len(store) == int(live.sum()) > 0.8 * capacity
    for slot in np.flatnonzero(live):  # every live key holds its own key and the values the reference filled
        stamp = store.stamps[slot]
        torch.testing.assert_close(store.keys[slot], reference.keys[stamp])
        np.testing.assert_array_equal(store.values[slot], reference.values[stamp])
    queries = unit_keys(6, rng)
    scores, slots = store.search_tensors(queries, k=8)
    # Against an exact search of the keys in each query's 4 nearest lists:
    probe = torch.topk(queries @ store._weight, 4).indices
    for q, lists, got_scores, got_slots in zip(queries, probe, scores, slots, strict=True):
        cand = np.flatnonzero(live & np.isin(np.arange(len(live)) // store.list_size, lists.numpy()))
        sims = store.keys[torch.from_numpy(cand)] @ q
        top, at = torch.topk(sims, 8)
        torch.testing.assert_close(got_scores, top)
        assert set(got_slots.tolist()) == set(cand[at.numpy()].tolist())


def test_eviction_is_oldest_first_across_lists_and_a_full_list_drops_its_own_oldest():
    rng = np.random.default_rng(2)
    store = OnlineStore(DIM, N_NEXT, capacity=6, coarse=coarse(2, rng), list_size=4, probes=2)
    home = store._weight[:, 0] / store._weight[:, 0].norm()  # a key that lands in list 0
    lists = store.assign(home[None].repeat(5, 1))
    assert lists.tolist() == [0] * 5
    store.add(home[None].repeat(5, 1), np.zeros(5, dtype=np.int64), np.arange(5))  # five keys for a ring of four
    assert len(store) == 4 and sorted(store.stamps[:4].tolist()) == [1, 2, 3, 4]  # key 0 dropped by its list
    other = store._weight[:, 1] / store._weight[:, 1].norm()
    # Keys 5..7: keys 0 and 1 are past capacity.
    store.add(other[None].repeat(3, 1), np.zeros(3, dtype=np.int64), np.arange(5, 8))
    live = sorted(store.stamps[store.stamps >= store.added - store.capacity].tolist())
    assert live == [2, 3, 4, 5, 6, 7] and len(store) == 6
    scores, slots = store.search_tensors(home[None], k=8)
    assert sorted(store.stamps[slots[0][slots[0] >= 0].numpy()].tolist()) == live  # key 1 is not found


def test_search_cost_is_fixed_whatever_the_fill():
    rng = np.random.default_rng(3)
    store = OnlineStore(DIM, N_NEXT, capacity=10_000, coarse=coarse(online_lists(10_000), rng))
    assert online_lists(10_000) == 512 and store.probes * store.list_size <= 1024
    shapes = []
    for _ in range(2):
        scores, slots = store.search_tensors(unit_keys(3, rng), k=50)
        shapes.append((scores.shape, slots.shape))
        store.add(unit_keys(5000, rng), np.zeros(5000, dtype=np.int64), np.arange(5000))
    assert shapes[0] == shapes[1] == ((3, 50), (3, 50))


def test_add_complete_reloads_finished_values_and_checks_their_shape():
    rng = np.random.default_rng(4)
    store = OnlineStore(DIM, N_NEXT, capacity=8, coarse=coarse(2, rng))
    keys = unit_keys(3, rng)
    values = np.arange(12, dtype=np.int32).reshape(3, 4)
    store.add_complete(keys, values)
    assert len(store) == 3 and not store._pending
    _, got = store.search(keys[1:2], k=1)
    np.testing.assert_array_equal(got[0, 0], values[1])
    with pytest.raises(ValueError, match=r"values must be \[3, 4\]"):
        store.add_complete(keys, values[:, :2])


def test_lists_given_by_the_caller_are_the_ones_assign_computes():
    rng = np.random.default_rng(5)
    a = OnlineStore(DIM, N_NEXT, capacity=100, coarse=coarse(8, rng))
    b = OnlineStore(DIM, N_NEXT, capacity=100, coarse=(a._weight, a._bias))
    keys = unit_keys(20, rng)
    a.add(keys, np.zeros(20, dtype=np.int64), np.arange(20))
    b.add(keys, np.zeros(20, dtype=np.int64), np.arange(20), lists=a.assign(keys).numpy())
    np.testing.assert_array_equal(a.stamps, b.stamps)
    assert a._copy.copies == 1 and b._copy.copies == 0  # the caller's lists came back with its own copy


def test_the_packed_copy_back_restores_every_dtype_and_shape():
    """The bytes a GPU step copies back in one transfer (the packing runs here on CPU tensors)."""
    from dresd_vllm.index.host_copy import pack_bytes, unpack_bytes

    tensors = [
        torch.tensor([True, False, True]),
        torch.randn(3, 5),
        torch.arange(-3, 12, dtype=torch.int64).reshape(3, 5),
        torch.randn(2, 3).half(),
        torch.arange(7, dtype=torch.int32),
    ]
    raw = pack_bytes(tensors).numpy()  # odd offsets: 3 bytes of flags first
    assert raw.dtype == np.uint8 and len(raw) == 3 + 60 + 120 + 12 + 28
    for got, want in zip(unpack_bytes(tensors, raw), tensors, strict=True):
        assert got.dtype == want.numpy().dtype and got.shape == tuple(want.shape)
        np.testing.assert_array_equal(got, want.numpy())
