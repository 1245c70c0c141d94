"""`dresd-bench replay` drafts and accepts exactly what the engine does, on the tiny model."""

import pytest
from conftest import ENGINE_DEFAULTS, GREEDY_MAX_TOKENS, K, in_process_vllm
from vllm import SamplingParams

from benchmarks.inputs import Method, Settings
from benchmarks.replay import record, replay, run_methods


def counters(llm) -> dict[str, float]:
    metrics = llm.get_metrics()
    return {
        name: sum(m.value for m in metrics if m.name == f"vllm:spec_decode_{name}")
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    }


@pytest.fixture(scope="module")
def settings(tiny_model) -> Settings:
    engine = {k: v for k, v in ENGINE_DEFAULTS.items() if k not in ("max_model_len", "max_num_seqs", "seed")}
    return Settings(
        model=tiny_model, num_speculative_tokens=K, max_tokens=GREEDY_MAX_TOKENS, batch_size=1, seed=0,
        temperature=0.0, top_p=1.0, max_model_len=ENGINE_DEFAULTS["max_model_len"], engine_args=engine,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trajectories(settings, plain_outputs, tmp_path_factory):
    prompts = [o.prompt_token_ids for o in plain_outputs]
    with in_process_vllm():
        return record(settings, prompts, [GREEDY_MAX_TOKENS] * len(prompts), tmp_path_factory.mktemp("replay"))


def test_trajectories_are_the_plain_greedy_outputs(trajectories, plain_outputs):
    for t, o in zip(trajectories, plain_outputs, strict=True):
        kept = t.tokens[t.prompt_len : t.prompt_len + t.output_len].tolist()
        assert kept == list(o.outputs[0].token_ids)
        assert t.states.shape[0] == len(t.tokens) - 1


@pytest.mark.parametrize(
    "options",
    [
        # The full proposer: dense + online store + context, length control. At a fixed price (the prior's at
        # batch 1): the engine fits its price from its step times, which a replay does not have.
        {"token_cost": 0.04},
        {"context": False, "online_store": False, "length_control": False},  # the paper's pure DReSD
    ],
    ids=["full", "pure"],
)
def test_replay_counts_equal_the_engines(options, settings, trajectories, plain_outputs, own_datastore, llm_factory):
    config = {"method": "dresd", "datastore": own_datastore, "num_speculative_tokens": K, **options}
    llm = llm_factory(settings.model, max_num_seqs=1, disable_log_stats=False, speculative_config=config)
    prompts = [{"prompt_token_ids": o.prompt_token_ids} for o in plain_outputs]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [list(o.outputs[0].token_ids) for o in plain_outputs]
    engine = counters(llm)

    (result,) = run_methods([Method("dresd", "dresd", config)], settings, trajectories)
    assert result["drafts"] > 0
    assert (result["drafts"], result["draft_tokens"], result["accepted_tokens"]) == (
        engine["num_drafts"], engine["num_draft_tokens"], engine["num_accepted_tokens"],
    )  # fmt: skip


def test_replay_of_a_perfect_proposer_takes_k_plus_one_tokens_a_step(trajectories):
    def oracle(req_ids, sampled, num_tokens, token_ids, verified, max_len):
        return [token_ids[0, num_tokens[0] : num_tokens[0] + max_len[0]].tolist()]  # reads the future

    result = replay(oracle, trajectories[:1], K, 512)
    t = trajectories[0]
    assert result["accepted_tokens"] == result["draft_tokens"]
    assert result["steps"] == 1 + -(-(t.output_len - 1) // (K + 1))


def test_replay_command_grid_and_best_of(tiny_model, prompts, own_datastore, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in prompts[:2]))
    out = tmp_path / "replay"
    command = [
        sys.executable, "-m", "benchmarks.cli", "replay", "--model", tiny_model, "--dataset", str(dataset),
        "--max-tokens", "16", "-k", "4", "--datastore", f"ID={own_datastore}", "--methods", "dresd,ngram,suffix",
        "--grid", "token_cost=0.02,0.5", "--best-of", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    report = json.loads((out / "replay.json").read_text())
    names = [m["name"] for m in report["methods"]]
    assert names == [
        "dresd-ID token_cost=0.02", "dresd-ID token_cost=0.5", "dresd-ID best-of-survivors",
        "dresd-ID+context token_cost=0.02", "dresd-ID+context token_cost=0.5", "ngram", "suffix",
    ]  # fmt: skip
    for m in report["methods"]:
        assert m["tokens_per_step"] >= 1 and m["output_tokens"] == report["methods"][0]["output_tokens"], m["name"]
    by_name = {m["name"]: m for m in report["methods"]}
    # A dearer verified token can only cut the full proposer's drafts shorter.
    cheap, dear = by_name["dresd-ID+context token_cost=0.02"], by_name["dresd-ID+context token_cost=0.5"]
    assert dear["draft_tokens_per_step"] <= cheap["draft_tokens_per_step"]
    assert report["best"]["dresd-ID+context"]["point"].startswith("dresd-ID+context token_cost=")
