"""The parts of DReSD's drafting path: online store, context source, scorer, cut and pick."""

import numpy as np
import pytest
import torch

from dresd_vllm.config import DresdConfig
from dresd_vllm.context import ContextSource
from dresd_vllm.datastore import Datastore
from dresd_vllm.drafting import Drafter
from dresd_vllm.online_store import OnlineStore
from dresd_vllm.scoring import CONTEXT, DENSE, Scorer, conditional, cut, gain, pick


def unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_online_store_fills_values_as_tokens_arrive_and_searches_exactly():
    store = OnlineStore(dim=2, n_next=3, capacity=8)
    tokens = np.array([[10, 11, 12, 13, 14, 15, 16]])
    # Two verified positions of request "a": the states that produced tokens 2 and 3.
    store.add(unit([[1, 0], [0, 1]]), ["a", "a"], np.array([2, 3]))
    store.fill(["a"], tokens, np.array([4]))
    scores, values = store.search(unit([[1, 0.1]]), k=3)
    assert values[0, 0].tolist() == [12, 13, -1, -1]  # what followed is known up to token 3
    assert values[0, 1].tolist() == [13, -1, -1, -1]
    assert scores[0, 0] > scores[0, 1] and scores[0, 2] == -np.inf and values[0, 2].tolist() == [-1] * 4

    store.fill(["a"], tokens, np.array([7]))
    _, values = store.search(unit([[1, 0]]), k=1)
    assert values[0, 0].tolist() == [12, 13, 14, 15]
    assert not store._pending  # complete values leave the pending list


def test_online_store_evicts_oldest_first_and_finished_requests_keep_their_values():
    store = OnlineStore(dim=2, n_next=1, capacity=3)
    tokens = np.arange(100).reshape(1, 100)
    for i in range(5):  # keys 0..4, each along its own direction
        angle = i * np.pi / 10
        store.add(unit([[np.cos(angle), np.sin(angle)]]), ["a"], np.array([i]))
        store.fill(["a"], tokens, np.array([i + 1]))
    assert len(store) == 3 and store.added == 5
    _, values = store.search(unit([[1, 0]]), k=3)
    assert sorted(values[0, :, 0].tolist()) == [2, 3, 4]  # keys 0 and 1 were evicted
    store.fill(["b"], tokens, np.array([1]))  # "a" left the batch: its open values stay as they are
    _, values = store.search(unit([[np.cos(0.4 * np.pi), np.sin(0.4 * np.pi)]]), k=1)
    assert values[0, 0].tolist() == [4, -1]


def test_online_store_rejects_zero_capacity():
    with pytest.raises(ValueError, match="capacity"):
        OnlineStore(dim=2, n_next=1, capacity=0)


def test_context_source_copies_the_requests_own_tokens():
    source = ContextSource(cached_requests=0)
    seq = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 8, 9, 1, 2, 5, 6]
    row = np.array([seq + [0] * 8])
    found = source.candidates(["a"], [[seq[-1]]], np.array([len(seq)]), row, width=5)
    assert found.tokens[0].tolist() == [7, 8, 9, 1, 2]
    assert found.match_len[0] >= 2 and np.all(found.probs[0] > 0)
    # Another request sees no other request's tokens without a global cache...
    other = source.candidates(["b"], [[6]], np.array([2]), np.array([[5, 6, 0]]), width=5)
    assert other.tokens[0].tolist() == [-1] * 5
    # ...and "a", absent from that batch, was stopped.
    assert set(source.cache.active_requests) == {"b"}


def test_context_source_global_cache_serves_earlier_responses():
    source = ContextSource(cached_requests=10)
    seq = [1, 2, 3, 4, 5, 6, 7, 8]
    source.candidates(["a"], [seq[2:]], np.array([8]), np.array([seq]), width=4)
    found = source.candidates(["b"], [[4]], np.array([2]), np.array([[3, 4]]), width=3)
    assert found.tokens[0, 0] == 5  # only "a"'s response holds what followed 3, 4


def test_context_source_gives_no_draft_to_a_partial_prefill():
    found = ContextSource().candidates(["a"], [[]], np.array([3]), np.array([[1, 2, 1]]), width=4)
    assert found.tokens[0].tolist() == [-1] * 4


def test_scorer_learns_from_accepted_lengths():
    scorer = Scorer()
    cells = scorer.cells(DENSE, np.array([[0.95, 0.95, 0.95]], np.float32), np.array([0]))[0]
    before = scorer.probability(cells)
    for _ in range(50):
        scorer.update(cells, 1)  # position 0 always accepted, position 1 always rejected
    after = scorer.probability(cells)
    assert after[0] > before[0] and after[1] < 0.2 and after[2] == before[2]  # position 2 never reached
    other = scorer.cells(CONTEXT, np.array([[0.95]], np.float32), np.array([0]))[0]
    assert scorer.probability(other)[0] == before[0]  # the other source's cells are its own

    frozen = Scorer(adapt=False)
    frozen.update(cells, 1)
    assert np.array_equal(frozen.probability(cells), before)


def test_cut_gain_and_pick():
    reach = np.array([[0.9, 0.5, 0.1, 0.0], [0.3, 0.2, 0.2, 0.1]])
    lengths = cut(reach, 0.2)
    assert lengths.tolist() == [2, 3]
    assert cut(reach, np.array([0.05, 0.5])).tolist() == [3, 0]
    gains = gain(reach, lengths, 0.2)
    assert gains == pytest.approx([0.7 + 0.3, 0.1 + 0.0 + 0.0])
    assert pick(np.array([[1.0, 0.5], [2.0, 0.5]])).tolist() == [1, 0]  # ties go to the first source


def test_conditional_ratios_of_a_chain():
    cumulative = np.array([[0.8, 0.4, 0.4, 0.0]], np.float32)
    assert conditional(cumulative)[0].tolist() == pytest.approx([0.8, 0.5, 1.0, 0.0])


def test_drafter_stands_down_where_no_draft_token_can_pay(own_datastore):
    """At batch 16 a CPU step is compute-bound: no search, no draft, but the context trees stay current."""
    datastore = Datastore.load(own_datastore)
    drafter = Drafter(datastore, DresdConfig.from_dict({"datastore": own_datastore}))
    batch, hidden = 16, datastore.manifest.hidden_size
    pattern = [5, 6, 7, 8, 9, 1, 2, 3]
    token_ids = np.array([pattern * 8] * batch)
    req_ids = [f"r{i}" for i in range(batch)]
    for n in range(20, 30):
        sampled = [[int(token_ids[i, n - 1])] for i in range(batch)]
        states = torch.randn(batch, hidden)
        drafts = drafter.step(req_ids, sampled, np.full(batch, n), token_ids, states, np.full(batch, 5))
        assert drafts == [[]] * batch
    assert drafter.stats.stood_down == 10 and drafter.retriever.stats.search_s == 0.0
    assert drafter.stats.online_keys == 10 * batch  # the online store still learns

    # Alone, the request drafts again, from a context tree that saw every token while standing down.
    n = 30
    sampled = [[int(token_ids[0, n - 1])]]
    drafts = drafter.step(req_ids[:1], sampled, np.array([n]), token_ids[:1], torch.randn(1, hidden), np.array([5]))
    assert drafts == [token_ids[0, n : n + 5].tolist()]
    assert drafter.stats.stood_down == 10
