"""The embedded default: the corpus split is clean, its extraction reproduces, the models serve in vLLM."""

import json
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from build_tools.embedded import extract_corpus
from build_tools.embedded.evaluate import parses
from dresd_vllm.assets import DEFAULT_DATASET, TINY_DRAFT_MODEL, TINY_MODEL

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
