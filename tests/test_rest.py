"""REST: the suffix array, REST's search semantics, and `"method": "rest"` in the real vLLM engine."""

import numpy as np
import pytest
from conftest import GREEDY_MAX_TOKENS, K
from transformers import AutoTokenizer
from vllm import SamplingParams

from dresd_vllm.config import RestConfig
from dresd_vllm.rest.drafting import RestDrafter
from dresd_vllm.rest.suffix_array import SuffixArrayStore, spread_sample, suffix_array, write_rest_datastore
from dresd_vllm.store.manifest import DatastoreError, tokenizer_fingerprint

GREEDY = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS)


@pytest.mark.parametrize(("length", "high"), [(0, 3), (1, 3), (7, 3), (300, 3), (300, 70_000)])
def test_suffix_array_sorts_every_suffix(length, high):
    # Separators (-1) and ids past 16 bits included: libdivsufsort sorts their bytes.
    tokens = np.random.default_rng(length).integers(-1, high, length).astype(np.int32)
    expected = sorted(range(length), key=lambda i: tokens[i:].tolist())
    assert suffix_array(tokens).tolist() == expected


def test_draft_follows_longest_matching_suffix_and_most_frequent_branch(tmp_path):
    sequences = [
        [1, 2, 3, 4, 5, 6, 7],
        [9, 2, 3, 4, 8, 8, 8],  # "2 3 4" continues with 8 here ...
        [0, 3, 4, 8, 1, 1, 1],  # ... and "3 4" with 8 twice
    ]
    store = SuffixArrayStore(write_rest_datastore(tmp_path / "rest.npz", sequences, {}))
    # The longest suffix that occurs, "1 2 3 4", occurs once: its continuation wins over "3 4"'s majority.
    assert store.draft(np.array([1, 2, 3, 4]), max_len=3, min_support=0.0) == [5, 6, 7]
    # "2 3 4" occurs twice (5 vs 8): ties go to the smaller token, and the support drops to one half.
    assert store.draft(np.array([7, 2, 3, 4]), max_len=3, min_support=0.0) == [5, 6, 7]
    assert store.draft(np.array([7, 2, 3, 4]), max_len=3, min_support=0.6) == []
    # "3 4": 5 once, 8 twice, then a tie (8 vs 1) to the smaller token; the chain stops at the end of
    # its sequence (4 tokens for max_len 5), never crossing into the next one.
    assert store.draft(np.array([6, 3, 4]), max_len=5, min_support=0.0) == [8, 1, 1, 1]
    assert store.draft(np.array([5, 5, 5]), max_len=3) == []


def test_capped_matches_keep_each_continuations_share(tmp_path):
    # The match range of "1 2" is sorted by continuation: 40 x "5 5" before 60 x "9 9". Keeping the
    # first 30 in that order drafted [5, 5]; every cap must still see 9 as the majority.
    sequences = [[1, 2, 9, 9]] * 60 + [[1, 2, 5, 5]] * 40
    store = SuffixArrayStore(write_rest_datastore(tmp_path / "rest.npz", sequences, {}))
    for cap in (1, 3, 7, 30, 99, 100, 5000):
        assert store.draft(np.array([1, 2]), max_len=2, max_matches=cap, min_support=0.0) == [9, 9], cap
    sample = spread_sample(store.occurrences([1, 2]), 30)
    assert len(sample) == 30 and sorted(store.tokens[sample + 2].tolist()) == [5] * 12 + [9] * 18


def test_rest_drafter_drafts_each_request_from_its_own_context(tmp_path):
    sequences = [[1, 2, 3, 4, 5, 6, 7], [9, 2, 3, 4, 8, 8, 8]]
    config = RestConfig(datastore=str(write_rest_datastore(tmp_path / "rest.npz", sequences, {})), min_support=0.0)
    drafter = RestDrafter(config)
    token_ids = np.array([[0, 1, 2, 3, 4, 0], [0, 9, 2, 3, 4, 0], [1, 2, 3, 4, 0, 0], [1, 2, 3, 4, 0, 0]])
    num_tokens = np.array([5, 5, 4, 4])
    # The third request sampled nothing (a partial prefill), the fourth has no room left.
    drafts = drafter.step([[4], [4], [], [4]], num_tokens, token_ids, np.array([3, 2, 3, 0]))
    assert drafts == [[5, 6, 7], [8, 8], [], []]
    drafter.check_model(tokenizer_fingerprint=None, vocab_size=10)
    with pytest.raises(DatastoreError, match="outside the served model's vocabulary"):
        drafter.check_model(tokenizer_fingerprint=None, vocab_size=9)


def test_bad_rest_file_is_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="bad.npz"):
        SuffixArrayStore(bad)
    with pytest.raises(ValueError, match="is not a file"):
        SuffixArrayStore(tmp_path / "missing.npz")


@pytest.fixture(scope="session")
def rest_datastore(tiny_model, plain_outputs, tmp_path_factory) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in plain_outputs]
    path = tmp_path_factory.mktemp("rest") / "rest.npz"
    return str(write_rest_datastore(path, sequences, {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}))


def test_rest_is_lossless_and_drafts(tiny_model, prompts, plain_outputs, rest_datastore, llm_factory):
    config = {"method": "rest", "datastore": rest_datastore, "num_speculative_tokens": K}
    llm = llm_factory(tiny_model, disable_log_stats=False, speculative_config=config)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain_outputs]
    (stats,) = llm.collective_rpc("dresd_stats")
    assert stats["draft_tokens"] > 0 and stats["faults"] == 0
    accepted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    assert accepted > 0


def test_rest_datastore_of_another_tokenizer_is_refused(tiny_model, plain_outputs, llm_factory, tmp_path):
    path = write_rest_datastore(tmp_path / "other.npz", [[1, 2, 3]], {"tokenizer_fingerprint": "sha256:other"})
    config = {"method": "rest", "datastore": str(path), "num_speculative_tokens": K}
    with pytest.raises(Exception, match="tokenizer_fingerprint"):  # vLLM wraps the proposer's error
        llm_factory(tiny_model, speculative_config=config)
