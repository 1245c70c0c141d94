"""dresd-build's input side: dataset formats, field lookup, templates, truncation, sharding. No engine."""

import gzip
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from build_tools.data import InputError, Template, encode_corpus, get_text, load_rows
from build_tools.embed import plan_shards
from build_tools.generate import _ranges

ROWS = [
    {"prompt": "What is a list?", "messages": [{"content": "What is a list?"}, {"content": "A sequence."}]},
    {"prompt": "What is a dict?", "messages": [{"content": "What is a dict?"}, {"content": "A mapping."}]},
    {"prompt": "What is a set?", "messages": [{"content": "What is a set?"}, {"content": "Unique items."}]},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_jsonl_gzip_and_save_to_disk_datasets_load_the_same_rows(tmp_path):
    import datasets

    lines = "".join(json.dumps(r) + "\n" for r in ROWS)
    (tmp_path / "d.jsonl").write_text(lines + "\n")  # a blank last line is fine
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(lines)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))

    assert load_rows(str(tmp_path / "d.jsonl")) == ROWS
    assert load_rows(str(tmp_path / "d.jsonl.gz"), limit=2) == ROWS[:2]
    assert load_rows(str(tmp_path / "d.jsonl.gz"), limit=1, skip=1) == ROWS[1:2]
    assert load_rows(str(tmp_path / "flat"), skip=1) == ROWS[1:]
    assert load_rows(str(tmp_path / "flat")) == ROWS
    assert load_rows(str(tmp_path / "dict"), split="train_sft", limit=1) == ROWS[:1]
    with pytest.raises(InputError, match=r"no split 'train'; it has \['train_sft'\]"):
        load_rows(str(tmp_path / "dict"))
    with pytest.raises(InputError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))


def test_fields_are_dotted_paths_and_errors_name_the_key_and_what_is_there():
    assert get_text(ROWS[1], "messages.1.content", 1) == "A mapping."
    with pytest.raises(
        InputError, match=r"row 2: no key 'question' in the row .* keys present: \['messages', 'prompt'\]"
    ):
        get_text(ROWS[2], "question", 2)
    with pytest.raises(InputError, match=r"messages has 2 items, no item 5"):
        get_text(ROWS[0], "messages.5.content", 0)
    with pytest.raises(InputError, match=r"'messages' is a list, expected a string"):
        get_text(ROWS[0], "messages", 0)


def test_chat_template_pairs_start_with_the_prompt_generate_sends(tokenizer):
    template = Template("chat", tokenizer)
    prompts, responses = ["def f(x): return x", "Hello there"], ["It returns x.", "General Kenobi"]
    heads = template.encode_prompts(prompts)
    pairs = template.encode_pairs(prompts, responses)
    for head, pair, prompt, response in zip(heads, pairs, prompts, responses, strict=True):
        assert pair[: len(head)] == head
        assert tokenizer.decode(pair) == f"<|user|>\n{prompt}</s>\n<|assistant|>\n{response}</s>\n"


def test_question_answer_and_format_string_templates(tokenizer):
    qa = Template("question-answer", tokenizer)
    (pair,) = qa.encode_pairs(["Why?"], ["Because."])
    assert tokenizer.decode(pair, skip_special_tokens=True) == "Question: Why?\nAnswer:\nBecause."
    custom = Template("Q: {prompt}\nA: ", tokenizer)
    assert tokenizer.decode(custom.encode_prompts(["Why?"])[0], skip_special_tokens=True) == "Q: Why?\nA: "
    with pytest.raises(InputError, match="expected one of"):
        Template("alpaca", tokenizer)


def test_tokenizer_without_chat_template_is_told_to_use_question_answer(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="--template question-answer"):
        Template("chat", tokenizer)


def test_corpus_truncates_to_max_length_and_skips_empty_responses(tokenizer):
    rows = [
        {"q": "short", "a": "yes"},
        {"q": "empty", "a": "   "},
        {"q": "long", "a": "word " * 200},
    ]
    corpus = encode_corpus(rows, Template("chat", tokenizer), "q", "a", max_length=64)
    assert corpus.summary()["sequences"] == 2 and corpus.skipped_empty == 1
    assert corpus.truncated == 1 and corpus.truncated_tokens > 100
    assert corpus.lengths.max() == 64 and len(corpus.tokens) == corpus.lengths.sum()
    assert [len(s) for s in corpus.sequences()] == corpus.lengths.tolist()
    with pytest.raises(InputError, match=r"no usable rows: 1 rows read, 1 with an empty 'a'"):
        encode_corpus(rows[1:2], Template("chat", tokenizer), "q", "a", max_length=64)


def test_shards_cover_every_sequence_once_and_depend_only_on_lengths():
    lengths = np.array([5, 300, 20, 20, 20, 700, 1, 1], dtype=np.int64)
    shards = plan_shards(lengths, shard_tokens=100)
    assert shards == [(0, 2), (2, 6), (6, 8)]
    assert plan_shards(lengths.copy(), 100) == shards
    assert plan_shards(lengths, 10**9) == [(0, 8)]


def test_generate_ranges_resume_from_any_row_and_realign_to_shards():
    assert _ranges(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert _ranges(6, 10, 4) == [(6, 8), (8, 10)]
    assert _ranges(8, 10, 4) == [(8, 10)]
    assert _ranges(10, 10, 4) == []
