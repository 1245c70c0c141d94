"""The parts of DReSD's drafting path: online store, context source, scorer, cut and pick."""

import numpy as np
import pytest
import torch

from dresd_vllm.config import DresdConfig
from dresd_vllm.online.store import OnlineStore
from dresd_vllm.spec.context import ContextSource
from dresd_vllm.spec.drafting import Drafter
from dresd_vllm.spec.request_rows import RequestRows
from dresd_vllm.spec.scoring import CONTEXT, DENSE, Scorer, TokenPrice, conditional, cut, gain, pick
from dresd_vllm.store.datastore import Datastore

A, B = 1, 2  # owner codes (RequestRows.codes) of requests "a" and "b"


def unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_online_store_fills_values_as_tokens_arrive_and_searches_exactly():
    store = OnlineStore(dim=2, n_next=3, capacity=8)
    tokens = np.array([[10, 11, 12, 13, 14, 15, 16]])
    # Two verified positions of request "a": the states that produced tokens 2 and 3.
    store.add(unit([[1, 0], [0, 1]]), np.array([A, A]), np.array([2, 3]))
    store.fill(np.array([A]), tokens, np.array([4]))
    scores, values = store.search(unit([[1, 0.1]]), k=3)
    assert values[0, 0].tolist() == [12, 13, -1, -1]  # what followed is known up to token 3
    assert values[0, 1].tolist() == [13, -1, -1, -1]
    assert scores[0, 0] > scores[0, 1] and scores[0, 2] == -np.inf and values[0, 2].tolist() == [-1] * 4

    store.fill(np.array([A]), tokens, np.array([7]))
    _, values = store.search(unit([[1, 0]]), k=1)
    assert values[0, 0].tolist() == [12, 13, 14, 15]
    assert not store._pending  # complete values leave the pending list


def test_online_store_evicts_oldest_first_and_finished_requests_keep_their_values():
    store = OnlineStore(dim=2, n_next=1, capacity=3)
    tokens = np.arange(100).reshape(1, 100)
    for i in range(5):  # keys 0..4, each along its own direction
        angle = i * np.pi / 10
        store.add(unit([[np.cos(angle), np.sin(angle)]]), np.array([A]), np.array([i]))
        store.fill(np.array([A]), tokens, np.array([i + 1]))
    assert len(store) == 3 and store.added == 5
    _, values = store.search(unit([[1, 0]]), k=3)
    assert sorted(values[0, :, 0].tolist()) == [2, 3, 4]  # keys 0 and 1 were evicted
    store.fill(np.array([B]), tokens, np.array([1]))  # "a" left the batch: its open values stay as they are
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
    cells = scorer.cells(DENSE, np.array([[0.95, 0.95, 0.95]], np.float32), np.array([0]))
    before = scorer.probability(cells[0])
    for _ in range(50):
        scorer.update(cells, np.array([3]), np.array([1]))  # position 0 always accepted, position 1 rejected
    after = scorer.probability(cells[0])
    assert after[0] > before[0] and after[1] < 0.2 and after[2] == before[2]  # position 2 never reached
    other = scorer.cells(CONTEXT, np.array([[0.95]], np.float32), np.array([0]))[0]
    assert scorer.probability(other)[0] == before[0]  # the other source's cells are its own

    frozen = Scorer(adapt=False)
    frozen.update(cells, np.array([3]), np.array([1]))
    assert np.array_equal(frozen.probability(cells[0]), before)


def test_scorer_batch_update_equals_one_update_per_draft():
    """One bincount over the batch counts what one `np.add.at` per draft counted, repeated cells included."""
    rng = np.random.default_rng(0)
    scorer, reference = Scorer(), Scorer()
    for _ in range(20):
        batch, width = 7, 6
        cells = scorer.cells(
            rng.integers(0, 2, batch), rng.random((batch, width)).astype(np.float32), rng.integers(0, 4, batch)
        )  # depths 3+ share a cell: a draft can count one cell twice
        lengths = rng.integers(1, width + 1, batch)
        accepted = np.minimum(rng.integers(0, width + 1, batch), lengths)
        scorer.update(cells, lengths, accepted)
        for row, n, a in zip(cells, lengths, accepted, strict=True):
            np.add.at(reference.trials, row[:n][: a + 1], 1.0)
            np.add.at(reference.accepted, row[:n][:a], 1.0)
    np.testing.assert_array_equal(scorer.trials, reference.trials)
    np.testing.assert_array_equal(scorer.accepted, reference.accepted)


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


def todays_cpu(batch: int, tokens: np.ndarray, typical: float, rng: np.random.Generator) -> np.ndarray:
    """Step seconds of a machine whose steps cost what today's constants say (0.04 x batch ** 1.15 of a step
    per draft token per request, at `typical` tokens a step), with 5% noise."""
    price, fixed = 0.04 * batch**1.15, 0.0002 * batch
    slope = price * fixed / (batch - price * typical)  # batch x slope / (fixed + slope x typical) = price
    return (fixed + slope * tokens) * rng.normal(1.0, 0.05, len(tokens))


def test_token_price_starts_at_todays_constants_and_a_fixed_one_stays():
    price = TokenPrice(0.04, 1.15)
    assert price(1) == 0.04 and price(16) == pytest.approx(0.04 * 16**1.15) and price(64) == 1.0
    assert [TokenPrice.bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]
    fixed = TokenPrice(0.04, 1.15, fixed=0.1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 12, 500)
    for x, t in zip(tokens, todays_cpu(1, tokens, 6.0, rng), strict=True):
        fixed.observe(1, int(x), float(t))
    assert fixed(1) == 0.1 and fixed.fitted(1) == pytest.approx(0.04, rel=0.15)  # used, and fitted (reported)


@pytest.mark.parametrize("machine", [0.04, 0.1, 0.01])
def test_token_price_fits_batch_one_from_step_times(machine):
    """At batch 1 drafts of 0-10 tokens spread the steps: the fit finds the machine's price (today's 0.04
    on a machine like today's, and others elsewhere) from 2000 noisy steps."""
    rng = np.random.default_rng(1)
    price = TokenPrice(0.04, 1.15)
    tokens = 1 + rng.integers(0, 11, 2000)
    slope = machine * 0.02 / (1 - machine * 6)  # a share `machine` of the mean step (6 tokens) per token
    for x, t in zip(tokens, (0.02 + slope * tokens) * rng.normal(1.0, 0.05, 2000), strict=True):
        price.observe(1, int(x), float(t))
    assert price(1) == pytest.approx(machine, rel=0.1, abs=0.004)  # the prior's weight: a tenth of the data's


def test_token_price_keeps_a_compute_bound_stand_down_and_lifts_it_where_steps_are_flat():
    rng = np.random.default_rng(3)
    prior = 0.04 * 16**1.15
    # A full batch of 16 that stands down verifies 16 tokens a step: nothing to fit, the prior stays.
    full = TokenPrice(0.04, 1.15)
    for t in todays_cpu(16, np.full(1000, 16.0), 16.0, rng):
        full.observe(16, 16, float(t))
    assert full(16) == pytest.approx(prior)
    # Batches of 12-16 that stand down: a request's token prices a draft token; today's CPU keeps its price.
    batches = rng.integers(12, 17, 3000)
    varied = TokenPrice(0.04, 1.15)
    for b in batches:
        varied.observe(int(b), int(b), float(todays_cpu(16, np.array([b]), 16.0, rng)[0]))
    assert varied(16) > 0.9 and varied(16) > 2 * varied.prior(1) * 16**0.15
    # A machine whose step hardly grows with its tokens (a GPU's memory-bound step) lifts the stand-down...
    flat = TokenPrice(0.04, 1.15)
    for b in batches:
        flat.observe(int(b), int(b), 0.01 + 1e-5 * b + rng.normal(0, 2e-4))
    assert flat(16) < 0.4  # under what the best cells' chances pay: the drafter searches and drafts again
    # ...and, once its drafts spread the steps, prices them at what they cost.
    drafting = TokenPrice(0.04, 1.15)
    for _ in range(1000):
        tokens = 16 + int(rng.integers(0, 80))
        drafting.observe(16, tokens, 0.01 + 2e-5 * tokens + rng.normal(0, 2e-4))
    assert drafting(16) == pytest.approx(16 * 2e-5 / (0.01 + 2e-5 * 56), rel=0.2)


def test_token_price_ignores_stalls():
    rng = np.random.default_rng(4)
    price = TokenPrice(0.04, 1.15)
    tokens = 1 + rng.integers(0, 11, 2000)
    seconds = todays_cpu(1, tokens, 6.0, rng)
    seconds[::50] *= 20  # another process took the CPU: a stall has nothing to do with the draft
    for x, t in zip(tokens, seconds, strict=True):
        price.observe(1, int(x), float(t))
    assert price(1) == pytest.approx(0.04, rel=0.1)


def test_request_rows_are_stable_freed_and_reused():
    rows = RequestRows(4)
    first = rows(["a", "b", "c"])
    assert sorted(first.tolist()) == [0, 1, 2] and rows.arrived.tolist() == [0, 1, 2]
    assert rows(["a", "b", "c"]) is first and len(rows.arrived) == 0  # the same batch: one comparison
    codes = rows.codes[first]
    assert len(set(codes.tolist())) == 3
    again = rows(["c", "a", "d"])  # b left, d arrived, the order changed
    assert again[:2].tolist() == [first[2], first[0]] and rows.arrived.tolist() == [2]
    assert again[2] not in again[:2] and rows.tags[again[0]] == hash("c")
    # Requests that stay keep their codes; d's is new, even where it took b's row.
    assert rows.codes[again[:2]].tolist() == codes[[2, 0]].tolist() and rows.codes[again[2]] not in codes
    rows(["e", "f", "g", "h"])  # all four rows taken by new requests
    with pytest.raises(RuntimeError, match="5 requests is more than the 4 rows"):
        rows(["a", "b", "c", "d", "e"])


def test_fitted_price_reproduces_todays_stand_down_and_batch_one(own_datastore):
    """Driven with the step times of a machine that costs what today's constants say, the drafter stands
    down at batch 16 as the constants make it, and drafts at batch 1 exactly what the constants draft."""
    datastore = Datastore.load(own_datastore)
    config = DresdConfig.from_dict({"datastore": own_datastore})
    fitted, constant = Drafter(datastore, config, max_num_seqs=16), Drafter(datastore, config, max_num_seqs=16)
    rng = np.random.default_rng(5)
    batch, hidden = 16, datastore.manifest.hidden_size
    pattern = [5, 6, 7, 8, 9, 1, 2, 3]
    token_ids = np.array([pattern * 40] * batch)
    req_ids = [f"r{i}" for i in range(batch)]
    now = 0.0
    for n in range(20, 50):
        sampled = [[int(token_ids[i, n - 1])] for i in range(batch)]
        now += float(todays_cpu(batch, np.array([batch]), batch, rng)[0])
        args = (req_ids, sampled, np.full(batch, n), token_ids, torch.randn(batch, hidden), np.full(batch, 5))
        assert fitted.step(*args, now) == constant.step(*args) == [[]] * batch
    assert fitted.stats.stood_down == 30 and fitted.stats.price_steps == 29
    assert fitted.stats.token_price == pytest.approx(0.04 * 16**1.15)

    n, tokens = 50, 1
    for _ in range(30):
        sampled = [token_ids[0, n - tokens : n].tolist()]
        now += float(todays_cpu(1, np.array([tokens]), 6.0, rng)[0])
        args = (req_ids[:1], sampled, np.array([n]), token_ids[:1], torch.randn(tokens, hidden), np.array([5]))
        draft = fitted.step(*args, now)
        assert draft == constant.step(*args)
        tokens = len(draft[0]) + 1  # the pattern repeats: every draft is accepted
        n += tokens
    assert fitted.stats.token_price == pytest.approx(0.04, rel=0.25)
    assert fitted.stats.stood_down == 30 and fitted.stats.context_tokens > 0
