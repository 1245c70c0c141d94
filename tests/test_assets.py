"""The embedded default: the corpus split is clean, its extraction reproduces, the models serve in vLLM,
SmolLM2 is converted and checked, and the data and draft made for it fit it."""

import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from build_tools import smollm2
from build_tools.embedded import extract_corpus
from build_tools.embedded.evaluate import parses
from dresd_assets import (
    DEFAULT_DATASET,
    DEFAULT_DRAFT_MODEL,
    DEFAULT_ID_CORPUS,
    DEFAULT_MODEL,
    TINY_DRAFT_MODEL,
    TINY_MODEL,
    ModelMissingError,
    check_default_model,
)

CORPUS = Path(DEFAULT_DATASET.train).parent
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
FIELDS = {"instruction", "response", "module", "qualname", "lineno"}


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    return DEFAULT_DATASET.rows("train")


@pytest.fixture(scope="module")
def eval_rows() -> list[dict]:
    return DEFAULT_DATASET.rows("eval")


def test_split_has_no_module_in_both_parts(train_rows, eval_rows):
    assert {r["module"] for r in train_rows}.isdisjoint(r["module"] for r in eval_rows)
    # Stricter: whole top-level packages are held out (no `email.utils` in train with `email.mime` in eval).
    assert {r["module"].split(".")[0] for r in train_rows}.isdisjoint(r["module"].split(".")[0] for r in eval_rows)
    assert 200 <= len(eval_rows) <= 1000 < len(train_rows)
    assert (len(train_rows), len(eval_rows)) == (MANIFEST["train_pairs"], MANIFEST["eval_pairs"])


def test_rows_are_documented_and_deduplicated(train_rows, eval_rows):
    rows = train_rows + eval_rows
    assert all(set(r) == FIELDS for r in rows)
    assert len({r["response"] for r in rows}) == len(rows)
    assert len({r["instruction"] for r in rows}) == len(rows)
    assert all(parses(r["response"]) for r in rows[::50])


def test_extraction_of_a_module_is_deterministic():
    source = Path(extract_corpus.STDLIB / "textwrap.py").read_text()
    first = extract_corpus.extract_module("textwrap", source)
    assert first and first == extract_corpus.extract_module("textwrap", source)
    assert {r["qualname"] for r in first} >= {"indent", "TextWrapper.wrap"}


@pytest.mark.skipif(
    ".".join(map(str, sys.version_info[:3])) != MANIFEST["python_version"],
    reason=f"the shipped corpus comes from the Python {MANIFEST['python_version']} standard library",
)
def test_extraction_reproduces_the_shipped_corpus_byte_for_byte(tmp_path):
    train, evals = extract_corpus.split(extract_corpus.extract())
    for rows, shipped in ((train, DEFAULT_DATASET.train), (evals, DEFAULT_DATASET.eval)):
        extract_corpus.write_jsonl_gz(rows, tmp_path / "out.jsonl.gz")
        assert (tmp_path / "out.jsonl.gz").read_bytes() == Path(shipped).read_bytes()


def test_models_share_the_tokenizer_and_stay_small():
    target, draft = Path(TINY_MODEL), Path(TINY_DRAFT_MODEL)
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    for model in (target, draft):
        config = json.loads((model / "config.json").read_text())
        assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM CPU attention
        assert (model / "model.safetensors").stat().st_size < 10 * 2**20


def test_default_model_writes_python_in_vllm(llm_factory, eval_rows):
    # The shortest held-out functions: a trained model finishes some of them within 64 tokens
    # (a CPU decode step takes ~0.1 s here; build_tools/embedded/evaluate.py measures properly).
    rows = sorted(eval_rows, key=lambda r: (len(r["response"]), r["qualname"]))[:8]
    llm = llm_factory(TINY_MODEL, max_model_len=1024)
    outputs = llm.chat(
        [[{"role": "user", "content": r["instruction"]}] for r in rows],
        SamplingParams(temperature=0.0, max_tokens=64),
        use_tqdm=False,
    )
    texts = [o.outputs[0].text for o in outputs]
    assert all(t.lstrip().startswith(("def ", "async def ", "@")) for t in texts), texts
    assert sum(map(parses, texts)) >= 2, texts


def test_draft_model_baseline_is_lossless_on_the_defaults(llm_factory, eval_rows):
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in eval_rows[::150]]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = llm_factory(TINY_MODEL, max_model_len=1024)
    expected = [o.outputs[0].token_ids for o in plain.chat(prompts, greedy, use_tqdm=False)]
    spec = llm_factory(
        TINY_MODEL,
        max_model_len=1024,
        disable_log_stats=False,
        speculative_config={"method": "draft_model", "model": TINY_DRAFT_MODEL, "num_speculative_tokens": 3},
    )
    assert [o.outputs[0].token_ids for o in spec.chat(prompts, greedy, use_tqdm=False)] == expected
    accepted = sum(m.value for m in spec.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    assert accepted > 0


def test_default_model_is_the_converted_smollm2():
    path = Path(check_default_model(full=True))
    config = json.loads((path / "config.json").read_text())
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert [config[k] for k in shape] == [30, 576, 9, 3, 49152]
    record = json.loads((path / "conversion.json").read_text())
    assert (record["wheel_sha256"], record["gguf_sha256"]) == (smollm2.WHEEL_SHA256, smollm2.GGUF_SHA256)
    assert record["dtype"] == smollm2.DTYPE == "float32"


def test_conversion_rerun_is_a_no_op(capsys):
    smollm2.main([])
    assert "nothing to do" in capsys.readouterr().out


def test_missing_or_damaged_checkpoint_names_its_rebuild(tmp_path):
    with pytest.raises(ModelMissingError, match=r"is missing: run `make install"):
        check_default_model(tmp_path / "nowhere")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "tokenizer.json", "conversion.json"):
        shutil.copy(Path(DEFAULT_MODEL) / name, damaged / name)
    (damaged / "model.safetensors").write_bytes(bytes(1024))  # a truncated copy
    with pytest.raises(ModelMissingError, match=r"is damaged: run `make install"):
        check_default_model(damaged)
    with pytest.raises(SystemExit, match=r"is damaged: run `make install"):
        smollm2.main(["--out", str(damaged), "--check"])


def test_id_corpus_is_smollm2s_answers_to_the_first_training_prompts(train_rows):
    manifest = json.loads((CORPUS / "smollm2-id.json").read_text())
    with gzip.open(DEFAULT_ID_CORPUS, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == manifest["jsonl_sha256"]
    rows = [json.loads(line) for line in data.splitlines()]
    assert len(rows) == manifest["rows"] >= 500
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in train_rows[: len(rows)]]
    assert sum(bool(r["output"]) for r in rows) >= 0.95 * len(rows)
    conversion = json.loads((Path(DEFAULT_MODEL) / "conversion.json").read_text())
    assert manifest["model"]["model_safetensors_sha256"] == conversion["model_safetensors_sha256"]


def test_smollm2_draft_model_fits_the_default_model():
    draft = Path(DEFAULT_DRAFT_MODEL)
    config = json.loads((draft / "config.json").read_text())
    target = json.loads((Path(DEFAULT_MODEL) / "config.json").read_text())
    assert config["vocab_size"] == target["vocab_size"] and config["tie_word_embeddings"]
    assert config["max_position_embeddings"] >= 2048
    assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM CPU attention
    assert (draft / "model.safetensors").stat().st_size <= 25 * 10**6
    training = json.loads((draft / "training.json").read_text())
    assert training["preset"] == "smollm2-draft" and training["data"].endswith("smollm2-id.jsonl.gz")
