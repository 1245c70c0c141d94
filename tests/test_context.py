"""dresd_vllm.spec.context: `ContextSource(...)` picks arctic-inference's suffix tree where it is installed and the
NumPy n-gram fallback otherwise; the fallback drafts what the suffix tree drafts on the cases that define it."""

import sys

import numpy as np
import pytest

from dresd_vllm.spec import context
from dresd_vllm.spec.context import ContextSource, SuffixTreeContext
from dresd_vllm.spec.context_ngram import NgramContext
from dresd_vllm.spec.ngram_index import ORDERS, ResponseRing, ngram_key, ngram_keys

SOURCES = [NgramContext] + ([SuffixTreeContext] if context.suffix_tree_available() else [])


def _step(source, req_ids, rows, width=5):
    """One step in which every request's last token was just sampled."""
    rows = [list(r) for r in rows]
    table = np.zeros((len(rows), max(map(len, rows)) + 4), dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    sampled = [[r[-1]] if r else [] for r in rows]
    return source.candidates(req_ids, sampled, np.array([len(r) for r in rows]), table, width)


@pytest.fixture
def no_arctic(monkeypatch):
    """arctic_inference unimportable, as after `pip install ".[gpu]"`."""
    monkeypatch.setitem(sys.modules, "arctic_inference", None)
    monkeypatch.setitem(sys.modules, "arctic_inference.suffix_decoding", None)
    context.suffix_tree_available.cache_clear()
    yield
    context.suffix_tree_available.cache_clear()


def test_without_arctic_inference_the_ngram_fallback_is_built(no_arctic):
    assert not context.suffix_tree_available()
    source = ContextSource(max_depth=12, cached_requests=3, min_token_prob=0.2)
    assert type(source) is NgramContext
    assert (source.max_depth, source.cached_requests, source.min_token_prob) == (12, 3, 0.2)


@pytest.mark.skipif(not context.suffix_tree_available(), reason="arctic-inference is not installed")
def test_with_arctic_inference_the_suffix_tree_is_built():
    assert type(ContextSource()) is SuffixTreeContext


@pytest.mark.parametrize("source_type", SOURCES)
def test_copies_the_requests_own_tokens(source_type):
    source = source_type(cached_requests=0)
    seq = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 8, 9, 1, 2, 5, 6]
    found = _step(source, ["a"], [seq])
    assert found.tokens[0].tolist() == [7, 8, 9, 1, 2]
    assert found.match_len[0] >= 2 and np.all(found.probs[0] > 0)
    # Another request sees no other request's tokens without a global cache, and "a", absent, was stopped.
    assert _step(source, ["b"], [[5, 6]]).tokens[0].tolist() == [-1] * 5
    assert set(source.active_requests) == {"b"}


@pytest.mark.parametrize("source_type", SOURCES)
def test_global_cache_serves_earlier_responses(source_type):
    source = source_type(cached_requests=10)
    seq = [1, 2, 3, 4, 5, 6, 7, 8]
    table = np.array([seq], dtype=np.int32)
    source.candidates(["a"], [seq[2:]], np.array([8]), table, 4)  # prompt 1, 2; response 3 .. 8
    found = _step(source, ["b"], [[3, 4]], width=3)
    assert found.tokens[0, 0] == 5  # only "a"'s response holds what followed 3, 4


@pytest.mark.parametrize("source_type", SOURCES)
def test_no_draft_for_a_partial_prefill_or_no_width(source_type):
    found = source_type().candidates(["a"], [[]], np.array([3]), np.array([[1, 2, 1]]), width=4)
    assert found.tokens[0].tolist() == [-1] * 4 and found.match_len[0] == 0
    found = _step(source_type(), ["a"], [[1, 2, 1, 2, 1]], width=0)
    assert found.tokens.shape == (1, 0)


def test_the_most_frequent_continuation_with_its_frequency():
    # After "1 2" came 3 twice and 4 once; after "1 2 3" came 5 once and 6 once.
    seq = [1, 2, 3, 5, 9, 1, 2, 4, 9, 1, 2, 3, 6, 9, 8, 1, 2]
    found = _step(NgramContext(cached_requests=0, min_token_prob=0.3), ["a"], [seq], width=4)
    assert found.match_len[0] == 2
    assert found.tokens[0, 0] == 3 and found.probs[0, 0] == pytest.approx(2 / 3)
    assert found.tokens[0, 1] in (5, 6) and found.probs[0, 1] == pytest.approx(1 / 3)
    assert found.tokens[0, 2:].tolist() == [-1, -1]  # at most max_spec_factor x 2 tokens matched


def test_longest_match_wins_and_min_prob_stops_the_chain():
    seq = [6, 1, 2, 3, 9, 8, 2, 3, 4, 5, 8, 2, 3, 4, 0, 6, 1, 2, 3]
    found = _step(NgramContext(cached_requests=0, min_token_prob=0.6), ["a"], [seq], width=4)
    assert found.match_len[0] == 4 and found.tokens[0].tolist() == [9, 8, 2, 3]  # "6 1 2 3" is the longest
    found = _step(NgramContext(cached_requests=0, max_depth=2, min_token_prob=0.6), ["a"], [seq], width=4)
    # Two tokens matched ("2 3"): 4 followed twice, 9 once (2/3), then 5 and 0 once each (1/3 < 0.6).
    assert found.match_len[0] == 2 and found.tokens[0].tolist() == [4, -1, -1, -1]


def test_drafts_grow_with_the_request_step_by_step():
    source = NgramContext(cached_requests=0)
    seq = [3, 1, 4, 1, 5, 9, 2, 6]
    rows = np.array([seq * 6], dtype=np.int32)
    for n in range(9, 5 * len(seq)):
        found = source.candidates(["a"], [[int(rows[0, n - 1])]], np.array([n]), rows, 4)
        matched = min(n - len(seq), 24)  # the same tokens one period back
        assert found.match_len[0] == matched
        assert found.tokens[0].tolist() == rows[0, n : n + min(4, matched)].tolist() + [-1] * (4 - min(4, matched))


def test_a_request_whose_tokens_are_not_the_ones_indexed_is_indexed_again():
    source = NgramContext(cached_requests=0)
    _step(source, ["a"], [[1, 2, 3, 1, 2]])
    # The same id, its row holding other tokens than the 5 indexed: drafts come from the row's tokens.
    found = _step(source, ["a"], [[7, 8, 9, 4, 7, 8, 9, 4, 5, 6, 7, 8]])
    assert found.match_len[0] == 2 and found.tokens[0, :3].tolist() == [9, 4, -1]


def test_keys_of_python_and_numpy_agree():
    tokens = np.array([5, 151000, 3, 0, 77, 2**20], dtype=np.int64)
    for order in ORDERS:
        keys = ngram_keys(tokens, order)
        assert keys.tolist() == [ngram_key(tokens.tolist(), end, order) for end in range(order - 1, len(tokens))]


def test_global_store_keeps_the_last_responses_within_its_capacity():
    store = ResponseRing(max_responses=2, capacity=32)

    def held(row: list[int]) -> list[int]:
        """Held positions ending in row's last two tokens (a chain may also hold positions of other n-grams)."""
        found = store.latest(np.array(row), len(row) - 1, 16)
        return [p for p in found if store.tokens[[(p - 1) % 32, p % 32]].tolist() == row[-2:] and p >= store.floor]

    for response in ([1, 4, 5, 6, 7], [2, 4, 5, 6, 8], [3, 4, 5, 6, 9]):
        store.add(response)
    assert {int(store.tokens[(p + 1) % 32]) for p in held([4, 5, 6])} == {8, 9}  # the first one was evicted
    store.add(list(range(100, 140)))  # longer than the ring: its last 31 tokens (and a separator) are kept
    assert store.floor == store.end - 32 and held([4, 5, 6]) == [] and held([108, 109]) == []
    assert held([137, 138]) == [store.end - 3]


@pytest.mark.skipif(not context.suffix_tree_available(), reason="arctic-inference is not installed")
def test_accepted_tokens_close_to_the_suffix_tree_on_a_repetitive_stream():
    """Drafting through a stream that repeats parts of itself, the fallback's drafts are accepted about as often."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 50, 300)
    text = np.concatenate([base, base[:150], rng.integers(0, 50, 80), base[50:200]]).astype(np.int32)
    rows = np.concatenate([text, np.zeros(16, np.int32)])[None]
    accepted = {}
    for source_type in (SuffixTreeContext, NgramContext):
        source, total = source_type(), 0
        for n in range(20, len(text)):
            draft = source.candidates(["r"], [[int(text[n - 1])]], np.array([n]), rows, 8).tokens[0]
            draft = draft[draft >= 0]
            total += int(np.cumprod(draft == rows[0, n : n + len(draft)]).sum())
        accepted[source_type] = total
    assert accepted[NgramContext] >= 0.9 * accepted[SuffixTreeContext] > 0
