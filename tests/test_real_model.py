"""The real model end to end: SmolLM2-135M-Instruct drafting with DReSD from a small datastore of its own answers.

The one test of the suite that runs the default model (about 30 times slower than the tiny one), so it
is kept to a few prompts: the shipped ID corpus is checked to be this model's greedy output, and DReSD
over a datastore of a few of its rows must accept drafts without changing a token.
"""

import json

import pytest
from conftest import ENGINE_DEFAULTS, in_process_vllm
from vllm import SamplingParams

from dresd_assets import DEFAULT_DATASET, DEFAULT_ID_CORPUS, DEFAULT_MODEL, check_default_model

STORE_ROWS = 12  # corpus rows in the datastore; the first PROMPTS of them are asked again
PROMPTS = 3
MAX_TOKENS = 48
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def corpus_rows() -> list[dict]:
    import gzip

    with gzip.open(DEFAULT_ID_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(STORE_ROWS), f, strict=False)]


@pytest.fixture(scope="module")
def smollm2_datastore(corpus_rows, tmp_path_factory) -> str:
    """`dresd-build datastore` over the first STORE_ROWS rows of the shipped ID corpus, in fp32."""
    from build_tools.build import run_datastore
    from build_tools.cli import parse_args

    out = tmp_path_factory.mktemp("smollm2") / "ds"
    engine = {k: v for k, v in ENGINE_DEFAULTS.items() if k != "max_model_len"}
    args = [
        "datastore", "--model", check_default_model(), "--dataset", DEFAULT_ID_CORPUS, "--limit", str(STORE_ROWS),
        "--response-key", "output", "--pca-sample", "2000", "--max-length", str(MAX_MODEL_LEN),
        "--out", str(out), "--engine-args", json.dumps(engine),
    ]  # fmt: skip
    with in_process_vllm():
        run_datastore(parse_args(args))
    return str(out)


def test_smollm2_dresd_is_lossless_and_accepts_drafts(llm_factory, corpus_rows, smollm2_datastore):
    # In-domain prompts (in the store) and one held-out one: acceptance on the first, exactness on all.
    rows = corpus_rows[:PROMPTS] + DEFAULT_DATASET.rows("eval")[:1]
    messages = [[{"role": "user", "content": r["instruction"]}] for r in rows]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    plain = llm_factory(DEFAULT_MODEL, max_model_len=MAX_MODEL_LEN)
    expected = plain.chat(messages, greedy, use_tqdm=False)
    # The shipped corpus is this model's own greedy output (fp32), so the answers start the same way.
    for row, output in zip(corpus_rows[:PROMPTS], expected, strict=False):
        assert row["output"].startswith(output.outputs[0].text), (row["output"], output.outputs[0].text)
    spec = llm_factory(
        DEFAULT_MODEL,
        max_model_len=MAX_MODEL_LEN,
        disable_log_stats=False,
        speculative_config={"method": "dresd", "datastore": smollm2_datastore, "num_speculative_tokens": 10},
    )
    outputs = spec.chat(messages, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    metrics = {m.name: m for m in spec.get_metrics()}
    assert metrics["vllm:spec_decode_num_accepted_tokens"].value > PROMPTS * MAX_TOKENS // 4
