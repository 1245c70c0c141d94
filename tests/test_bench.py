"""dresd-bench on real engines (tiny Llama, CPU): every method in one run, its JSON and charts, lossless flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.compare import failures, judge
from benchmarks.metrics import stats_delta
from benchmarks.serve import arrival_times

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    # A process of its own, as users run it: its engines and environment stay out of this session's.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [sys.executable, "-m", "benchmarks.cli", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def bench_data(tiny_model, prompts, plain_outputs, tmp_path_factory) -> dict[str, str]:
    """The test prompts as a JSONL dataset, and a REST store of the tiny model's greedy answers to them.

    With the plain `{prompt}` template these are the token sequences `own_datastore` (DReSD) holds.
    """
    from build_tools.cli import main as build

    work = tmp_path_factory.mktemp("bench")
    dataset = work / "prompts.jsonl"
    rows = [{"instruction": p, "response": o.outputs[0].text} for p, o in zip(prompts, plain_outputs, strict=True)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rest = work / "rest.npz"
    argv = ["rest", "--tokenizer", tiny_model, "--dataset", str(dataset), "--template", "{prompt}", "--out", str(rest)]
    assert build(argv) == 0
    return dict(dataset=str(dataset), rest=str(rest))


def common(tiny_model: str, bench_data: dict, own_datastore: str, out: Path) -> list[str]:
    return [
        "--model", tiny_model, "--dataset", bench_data["dataset"], "--limit", "4", "--max-tokens", "24", "-k", "4",
        "--datastore", f"ID={own_datastore}", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.engine
def test_per_step_figures_count_every_step_near_max_model_len(tmp_path):
    """k = 10 against 32 tokens: near max_model_len, vLLM skips the drafter and verifies k placeholders.

    compare's default max_model_len leaves the drafter room on every step, so at batch 1 it runs once per
    request step; the request steps are counted on every step all the same (the engine's own execute_model),
    or drafted steps would pass 100% and draft tokens per step pass k where the drafter is skipped.
    """
    from dresd_assets import TINY_DRAFT_MODEL, TINY_MODEL

    out = tmp_path / "compare"
    run = run_bench(
        "compare", "--model", TINY_MODEL, "--draft-model", TINY_DRAFT_MODEL, "--methods", "vanilla,ngram,draft_model",
        "--limit", "2", "--max-tokens", "32", "-k", "10", "--repeats", "1", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for m in json.loads((out / "compare.json").read_text())["methods"][1:]:
        assert m["status"] == "ok" and m["lossless"] is True, m["name"]
        assert m["drafted_step_share"] <= 1 and m["draft_tokens_per_step"] <= 10, m["name"]
        # Each output token is a step's sampled token or an accepted draft token (vLLM also counts the
        # accepted tokens that max_tokens cut, hence >=).
        assert m["output_tokens"] - m["accepted_tokens"] <= m["request_steps"] <= m["output_tokens"], m["name"]
        assert m["proposer_steps"] == m["request_steps"], m["name"]


def test_sweep_replays_every_point_and_picks_the_best_estimate(tiny_model, bench_data, own_datastore, tmp_path):
    out = tmp_path / "sweep"
    run = run_bench(
        "sweep", "--model", tiny_model, "--dataset", bench_data["dataset"], "--skip", "1", "--limit", "2",
        "--max-tokens", "16", "--datastore", f"ID={own_datastore}", "--methods", "dresd,ngram",
        "--grid", "top_k=10,50", "--grid", "token_cost=0.02,0.5", "-k", "4", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    report = json.loads((out / "sweep.json").read_text())
    assert report["prompts"]["skip"] == 1 and report["prompts"]["prompts"] == 2
    points = {p["name"]: p for p in report["points"]}
    grid = [f"top_k={t} token_cost={c}" for t in (10, 50) for c in (0.02, 0.5)]
    entries = ("dresd-ID", "dresd-ID+context")
    assert {f"{e} {g}" for e in entries for g in grid} | {"ngram"} == set(points)
    for entry in entries:
        best = report["best"][entry]
        mine = [points[f"{entry} {g}"] for g in grid]
        assert best["estimated_speedup"] == max(p["estimated_speedup"] for p in mine)
        assert best["point"] == f"{entry} top_k={best['top_k']} token_cost={best['token_cost']}"
    # A dearer token cuts drafts shorter.
    cheap, dear = (points[f"dresd-ID+context top_k=50 token_cost={c}"] for c in (0.02, 0.5))
    assert dear["draft_tokens_per_step"] < cheap["draft_tokens_per_step"]
    assert (out / "table.md").is_file() and (out / "sweep.png").read_bytes().startswith(PNG)


def test_compare_runs_every_method_losslessly_in_one_run(tiny_model, bench_data, own_datastore, tmp_path):
    out = tmp_path / "compare"
    run = run_bench(
        "compare", *common(tiny_model, bench_data, own_datastore, out),
        "--rest-datastore", bench_data["rest"], "--draft-model", tiny_model, "--repeats", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    report = json.loads((out / "compare.json").read_text())
    methods = {m["name"]: m for m in report["methods"]}
    assert list(methods) == ["vanilla", "ngram", "suffix", "draft_model", "rest", "dresd-ID", "dresd-ID+context"]
    settings = {key: report["settings"][key] for key in ("num_speculative_tokens", "max_tokens", "batch_size", "seed")}
    assert settings == {"num_speculative_tokens": 4, "max_tokens": 24, "batch_size": 1, "seed": 0}
    # The prompts are rendered with the template the DReSD datastore records.
    assert report["prompts"]["prompts"] == 4 and report["prompts"]["template"] == "{prompt}"
    assert report["machine"]["cpu"] and report["machine"]["cores"] >= 1 and "gpus" in report["machine"]
    assert {"vllm (module)", "torch (module)", "faiss (module)", "dresd-vllm"} <= set(report["versions"])
    # Two interleaved rounds: medians of the runs, their spread, one vanilla per round for the speedup.
    assert run.stdout.index("round 1/2: dresd-ID") < run.stdout.index("round 2/2: vanilla")
    for name, m in methods.items():
        assert m["status"] == "ok" and m["lossless"] is True and m["mismatched_prompts"] == [], name
        assert m["output_tokens"] > 0 and m["tokens_per_s"] > 0 and m["speedup"] > 0, name
        assert m["repeats"] == 2 and len(m["runs"]) == 2, name
        low, high = m["spread"]["tokens_per_s"]
        assert low <= m["tokens_per_s"] <= high and [low, high] == sorted(r["tokens_per_s"] for r in m["runs"]), name
        assert m["model_runner"] in ("V1", "V2") and m["async_scheduling"] in (True, False), name
        if name == "vanilla":
            assert m["speedup"] == 1.0 and "acceptance_rate" not in m and m["tokens_per_step"] == 1.0
            continue
        assert 0 <= m["acceptance_rate"] <= 1 and m["mean_acceptance_length"] >= 1, name
        # Over all steps, tokens per step lies between 1 and vLLM's figure for the drafted steps alone.
        assert 1 <= m["tokens_per_step"] <= m["mean_acceptance_length"] + 1e-9, name
        # At batch 1 every drafted step is a step: drafts <= request steps <= output tokens.
        assert m["drafts"] <= m["request_steps"] <= m["output_tokens"], name
        assert m["output_tokens"] - m["accepted_tokens"] <= m["request_steps"], name
        assert m["drafted_step_share"] <= 1 and m["draft_tokens_per_step"] <= 4, name
        assert len(m["acceptance_by_position"]) == 4, name
        assert m["proposer_steps"] > 0 and 0 < m["proposer_share"] < 1, name
    assert methods["dresd-ID"]["mean_acceptance_length"] > 2  # the store holds these very answers
    assert [t["method"] for t in report["targets"]] == ["dresd-ID", "dresd-ID+context"]
    assert "all_met" in report["targets"][0]
    assert methods["dresd-ID"]["speculative_config"]["context"] is False  # the paper's pure DReSD
    assert "context" not in methods["dresd-ID+context"]["speculative_config"]  # the full proposer's defaults
    assert methods["dresd-ID"]["proposer_stats"]["search_ms_per_step"] > 0
    assert methods["rest"]["proposer_stats"]["steps"] > 0
    for chart in ("speedup.png", "acceptance_by_position.png"):
        assert (out / chart).read_bytes()[:4] == PNG
    assert "dresd-ID" in (out / "table.md").read_text() and "lossless" in run.stdout


def test_serve_drives_the_openai_server_at_each_concurrency(tiny_model, bench_data, own_datastore, tmp_path):
    out = tmp_path / "serve"
    run = run_bench(
        "serve", *common(tiny_model, bench_data, own_datastore, out),
        "--methods", "vanilla,dresd", "--concurrency", "1,2", "--requests", "4", "--limit", "8",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    report = json.loads((out / "serve.json").read_text())
    assert [m["name"] for m in report["methods"]] == ["vanilla", "dresd-ID", "dresd-ID+context"]
    for m in report["methods"]:
        assert [level["concurrency"] for level in m["levels"]] == [1, 2]
        assert [level["first_prompt"] for level in m["levels"]] == [0, 4]  # each level its own prompts
        for level in m["levels"]:
            assert level["lossless"] is True and level["requests"] == 4 and level["output_tokens"] > 0
            assert level["output_tokens_per_s"] > 0 and level["latency_s"]["p50"] > 0 and level["ttft_s"]["p99"] > 0
    dresd = report["methods"][1]["levels"]
    assert all(level["drafts"] > 0 and level["mean_acceptance_length"] > 1 for level in dresd)
    assert (out / "serve.png").read_bytes()[:4] == PNG


def test_stats_window_subtracts_counters_and_keeps_gauges():
    """The fitted token price and the online store's size are values now: a window reports them, not their change."""
    before = {"steps": 10, "search_s": 1.0, "token_price": 0.04, "token_price_b1": 0.04, "online_keys": 500}
    after = {"steps": 30, "search_s": 1.5, "token_price": 0.05, "token_price_b1": 0.05, "online_keys": 900}
    window = stats_delta(before, after)
    assert window is not None
    assert window["steps"] == 20 and window["search_s"] == 0.5 and window["search_ms_per_step"] == 25.0
    assert window["token_price"] == 0.05 and window["token_price_b1"] == 0.05 and window["online_keys"] == 900


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    times = arrival_times(2000, 50.0, seed=0)
    assert times == arrival_times(2000, 50.0, seed=0) and times[0] == 0 and times == sorted(times)
    assert 1999 / times[-1] == pytest.approx(50.0, rel=0.1)
    assert arrival_times(3, float("inf"), seed=0) == [0.0, 0.0, 0.0]


def test_a_mismatch_or_a_failed_method_fails_the_run():
    results = [
        dict(name="vanilla", status="ok", tokens_per_s=100.0, outputs=[[1, 2], [3]]),
        dict(name="same", status="ok", tokens_per_s=150.0, outputs=[[1, 2], [3]]),
        dict(name="changed", status="ok", tokens_per_s=150.0, outputs=[[1, 2], [4]]),
        dict(name="broken", status="failed", error="RuntimeError: no engine"),
    ]
    judge(results, greedy=True)
    assert results[1]["speedup"] == 1.5 and results[1]["lossless"] is True
    assert results[2]["lossless"] is False and results[2]["mismatched_prompts"] == [1]
    assert [line.split(":")[0] for line in failures(results)] == ["changed", "broken"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "rest"], "needs --rest-datastore"),
        (["--methods", "eagle"], "unknown ['eagle']"),
        (["--datastore", "a", "--datastore", "b"], "unique name"),
        (["--method-config", "ngram={bad"], "not JSON"),
    ],
)
def test_bad_input_exits_2_with_the_reason(tiny_model, argv, message, capsys):
    assert main(["compare", "--model", tiny_model, *argv]) == 2
    assert message in capsys.readouterr().err
