"""The retriever: search and one copy back, first-token filter, trie and top-1 merges, lengths, stats, the merge."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dresd_vllm.online.store import OnlineStore
from dresd_vllm.spec.retriever import Retriever, RetrieverStats
from dresd_vllm.spec.trie_merge import DenseCandidates, trie_path
from dresd_vllm.store.datastore import Datastore
from dresd_vllm.store.manifest import Manifest
from dresd_vllm.store.projection import Projection
from dresd_vllm.store.writer import token_store_from_sequences, write_datastore

H = 8
N_NEXT = 4
EOS = 1


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(axis: int, cosine: float, other: int) -> np.ndarray:
    """A unit vector with the given cosine to basis vector ``axis``, the rest along ``other``."""
    v = np.zeros(H)
    v[axis], v[other] = cosine, np.sqrt(1 - cosine**2)
    return v


# Keys at position 0 of each sequence: (sequence, query axis, cosine to it). value[0] is the
# sequence's second token, the draft the next four. Every other position is a filler key pointing
# away from both query axes.
SEQUENCES = [
    ([0, 5, 1, 2, 3, 4], 0, 0.99),  # A
    ([0, 7, 9, 9, 9, 9], 0, 0.98),  # B: nearer than C but produced another token
    ([0, 5, 1, 2, 8, 8], 0, 0.50),  # C
    ([0, 6, 1, 2, 3, 9], 1, 0.90),  # D: the nearest for axis 1 ...
    ([0, 6, 4, 5, 6, 9], 1, 0.85),  # E  ... but E and F agree, and outweigh it
    ([0, 6, 4, 5, 7, 9], 1, 0.84),  # F
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tokens, offsets = token_store_from_sequences([s for s, _, _ in SEQUENCES], N_NEXT, EOS)
    filler = -(np.eye(H)[0] + np.eye(H)[1]) / np.sqrt(2)
    keys = np.tile(filler, (len(offsets), 1))
    row = 0  # the key of position 0 of each sequence
    for i, (seq, axis, cosine) in enumerate(SEQUENCES):
        keys[row] = unit(axis, cosine, other=2 + i)
        row += len(seq)
    keys = keys.astype(np.float16)
    # Identity projection (H = d, mean 0, std 1): a query is its own key.
    identity = Projection(np.zeros(H), np.ones(H), np.eye(H), np.zeros(H))
    manifest = Manifest(
        model="m",
        hidden_size=H,
        vocab_size=16,
        tokenizer_fingerprint=None,
        template="t",
        n_next=N_NEXT,
        pca_dim=H,
        num_keys=len(offsets),
        index_factory="Flat",
    )
    return write_datastore(tmp_path_factory.mktemp("r") / "ds", manifest, identity, keys, tokens, offsets)


@pytest.fixture(scope="module")
def datastore(store) -> Datastore:
    return Datastore.load(store)


def axis(i: int, batch: int = 1) -> torch.Tensor:
    return torch.eye(H)[i].repeat(batch, 1)


def draft(r: Retriever, hidden: torch.Tensor, last: np.ndarray, max_len: int | np.ndarray = 10) -> list[list[int]]:
    """Each request's chain cut at the retriever's min_support (trie) and at ``max_len``."""
    found = r.candidates(r.search(hidden, np.arange(len(hidden))), last, N_NEXT)
    lengths = np.minimum(found.lengths(r.min_support if r.merge == "trie" else 0.0), max_len)
    return [found.tokens[i, : lengths[i]].tolist() for i in range(len(hidden))]


def merge_trie(drafts, weights, valid, min_support):
    chains, support = trie_path(drafts, weights, valid)
    return chains, DenseCandidates(chains, support, valid.sum(axis=1), drafts, valid).lengths(min_support)


def test_the_keys_are_where_the_test_thinks(datastore):
    scores, ids = datastore.index.search(datastore.projection(axis(0)), 3)
    np.testing.assert_allclose(scores[0], [0.99, 0.98, 0.50], atol=2e-3)
    assert datastore.first_tokens(ids).tolist() == [[5, 7, 5]]


def test_first_token_filter_and_top1(datastore):
    r = Retriever(datastore, top_k=10, merge="top1", max_candidates=10)
    assert draft(r, axis(0, 3), np.array([5, 7, 3]), 10) == [[1, 2, 3, 4], [9, 9, 9, 9], []]
    assert draft(r, axis(1), np.array([6]), 10) == [[1, 2, 3, 9]]  # the nearest survivor


def test_trie_follows_the_heaviest_branch(datastore):
    r = Retriever(datastore, top_k=10, merge="trie", min_support=0.0)
    assert draft(r, axis(1), np.array([6]), 10) == [[4, 5, 6, 9]]  # E + F outweigh the nearer D
    assert draft(r, axis(0), np.array([5]), 10) == [[1, 2, 3, 4]]  # A and C agree on 1 2, A is heavier after


def test_trie_stops_where_support_runs_out(datastore):
    # axis 1: total weight 2.59; the E/F branch holds 1.69 (0.65) for two tokens, then E alone 0.85 (0.33)
    assert draft(Retriever(datastore, top_k=10, min_support=0.5), axis(1), np.array([6]), 10) == [[4, 5]]
    assert draft(Retriever(datastore, top_k=10, min_support=0.7), axis(1), np.array([6]), 10) == [[]]
    # axis 0: A + C share 1 2 (support 1.0), then A alone holds 0.99 / 1.49 = 0.66
    assert draft(Retriever(datastore, top_k=10, min_support=0.7), axis(0), np.array([5]), 10) == [[1, 2]]
    assert draft(Retriever(datastore, top_k=10, min_support=1.0), axis(0), np.array([5]), 10) == [[1, 2]]


def test_max_candidates_keeps_the_nearest_survivors(datastore):
    r = Retriever(datastore, top_k=10, min_support=0.0, max_candidates=1)
    assert draft(r, axis(1), np.array([6]), 10) == [[1, 2, 3, 9]]  # only D is merged: the same as top-1


@pytest.mark.parametrize("merge", ["trie", "top1"])
def test_lengths_per_request(datastore, merge):
    r = Retriever(datastore, top_k=10, merge=merge, min_support=0.0)
    last = np.array([5, 5, 5, -1])
    assert draft(r, axis(0, 4), last, np.array([2, 0, 10, 10])) == [[1, 2], [], [1, 2, 3, 4], []]
    assert draft(r, axis(0, 2), last[:2], 0) == [[], []]


def test_stats(datastore):
    r = Retriever(datastore, top_k=3, max_candidates=3)
    draft(r, axis(0, 2), np.array([5, 7]), 3)
    s = r.stats
    assert (s.calls, s.requests, s.hits, s.survivors) == (1, 2, 6, 3)
    assert s.projection_s > 0 and s.search_s > 0 and s.merge_s > 0
    assert s.online_search_s == 0 and s.online_survivors == 0  # no online store
    snapshot = s.snapshot()
    s.reset()
    assert s == RetrieverStats() and snapshot.calls == 1


def test_search_copies_back_once_and_books_the_online_search_as_its_own_stage(datastore):
    online = OnlineStore(H, N_NEXT, capacity=16)
    r = Retriever(datastore, top_k=4)
    verified = axis(0, 3)  # three verified rows; the last two are requests' queries
    found = r.search(verified, np.array([0, 2]), online)
    assert r._copy.copies == 1 and found.online_scores is None  # an empty store is not searched
    assert found.keys.shape == (3, H) and found.lists is not None and found.lists.tolist() == [0, 0, 0]
    assert found.scores.shape == found.ids.shape == (2, 4)
    online.add(found.keys, np.array([0, 0, 1]), np.array([0, 1, 0]), found.lists)  # requests coded 0 and 1
    online.fill(np.array([0, 1]), np.array([[5, 1, 2, 3, 4, 9], [5, 1, 2, 0, 0, 0]]), np.array([6, 3]))
    found = r.search(verified, np.array([0, 2]), online)
    assert r._copy.copies == 2 and r.stats.online_search_s > 0 and r.stats.search_s > 0
    assert found.online_values is not None and found.online_values.shape == (2, 4, N_NEXT + 1)
    chains = r.candidates(found, np.array([5, 5]), N_NEXT)
    assert r.stats.online_survivors > 0 and chains.tokens[0].tolist() == [1, 2, 3, 4]
    stood_down = r.search(verified, np.array([0, 2]), online, search=False)  # keys for the store only
    assert stood_down.ids.shape == (2, 0) and stood_down.online_values is None and r._copy.copies == 3


def test_bad_input(datastore):
    r = Retriever(datastore, top_k=4)
    hidden = axis(0, 2)
    hidden[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf in 1 of 2 rows \(rows \[1\]\)"):
        draft(r, hidden, np.array([5, 5]), 4)
    with pytest.raises(ValueError, match=r"last_tokens must have shape \(2,\)"):
        draft(r, axis(0, 2), np.array([5]), 4)
    with pytest.raises(ValueError, match="unknown merge 'vote'"):
        Retriever(datastore, merge="vote")
    with pytest.raises(ValueError, match=r"min_support must be in \[0, 1\], got 1.5"):
        Retriever(datastore, min_support=1.5)


def test_drafts_from_stored_states_are_their_own_continuations(tmp_path):
    """End to end on a fitted projection: a stored state retrieves its own key, so top-1 drafts its value."""
    rng = np.random.default_rng(0)
    sequences = [rng.integers(2, 40, size=n) for n in (60, 45, 80)]
    tokens, offsets = token_store_from_sequences(sequences, N_NEXT, EOS)
    states = rng.standard_normal((len(offsets), 32)).astype(np.float32)
    projection = Projection.fit(states, dim=16)
    manifest = Manifest("m", 32, 40, None, "t", N_NEXT, 16, len(offsets), "Flat")
    ds = Datastore.load(
        write_datastore(tmp_path / "ds", manifest, projection, projection.transform(states), tokens, offsets)
    )
    rows = rng.choice(len(offsets), size=16, replace=False)
    values = ds.continuations(rows[:, None])[:, 0]
    drafts = draft(Retriever(ds, top_k=8, merge="top1"), torch.from_numpy(states[rows]), values[:, 0], 3)
    assert drafts == values[:, 1:4].tolist()


def reference_merge(drafts, weights, valid, min_support):
    """A literal prefix trie walk in Python: the heaviest child each step, ties to the best-ranked member."""
    members = [c for c in range(len(valid)) if valid[c]]
    total = sum(weights[c] for c in members)
    chain = []
    for depth in range(drafts.shape[1]):
        if not members:
            break
        children = {}
        for c in members:
            children.setdefault(int(drafts[c, depth]), []).append(c)
        token, group = max(children.items(), key=lambda kv: (sum(weights[c] for c in kv[1]), -min(kv[1])))
        if sum(weights[c] for c in group) < min_support * total * (1 - 1e-6):
            break
        chain.append(token)
        members = group
    return chain


@pytest.mark.parametrize("min_support", [0.0, 0.3, 0.6])
def test_vectorised_merge_matches_a_literal_trie(min_support):
    rng = np.random.default_rng(int(min_support * 10))
    batch, num, width = 300, 6, 5
    drafts = rng.integers(0, 3, size=(batch, num, width))  # 3 tokens: many shared prefixes and ties
    valid = rng.random((batch, num)) < 0.8
    valid[:5] = False  # requests with no survivor
    weights = np.where(valid, rng.integers(1, 4, size=(batch, num)), 0).astype(np.float32)  # exact sums
    chains, lengths = merge_trie(drafts, weights, valid, min_support)
    for b, (chain, length) in enumerate(zip(chains, lengths, strict=True)):
        assert chain[:length].tolist() == reference_merge(drafts[b], weights[b], valid[b], min_support), b


def test_merge_of_identical_drafts_and_of_one_candidate():
    drafts = np.array([[[3, 4, 5], [3, 4, 5]], [[7, 8, 9], [0, 0, 0]]])
    valid = np.array([[True, True], [True, False]])
    weights = np.array([[0.5, 0.5], [0.2, 0.0]], dtype=np.float32)
    chains, lengths = merge_trie(drafts, weights, valid, 1.0)
    assert [c[:n].tolist() for c, n in zip(chains, lengths, strict=True)] == [[3, 4, 5], [7, 8, 9]]


def test_the_served_step_reads_no_device_data_before_its_one_copy_back(store, datastore):
    """What a GPU needs of Drafter.step, checked on the CPU: no value read on the host, no data-dependent shape."""
    from benchmarks.gpu_check import HostWaits
    from dresd_vllm.config import DresdConfig
    from dresd_vllm.spec.drafting import Drafter

    config = DresdConfig.from_dict({"datastore": str(store), "top_k": 10, "token_cost": 0.0, "online_store_size": 64})
    drafter = Drafter(datastore, config)
    token_ids = np.array([[0, 5, 1, 2, 3, 4, 0, 0], [0, 6, 4, 5, 6, 9, 0, 0]])
    steps = 4
    with HostWaits() as waits:
        for n in range(2, 2 + steps):
            sampled = [[int(token_ids[0, n - 1])], [int(token_ids[1, n - 1])]]
            drafter.step(["a", "b"], sampled, np.array([n, n]), token_ids, axis(0, 2), np.array([4, 4]))
    assert waits.ops == []
    assert drafter.retriever._copy.copies == steps and drafter.online is not None and len(drafter.online) == 2 * steps
    assert drafter.online._copy.copies == 0  # the store's lists came back with the step's copy
