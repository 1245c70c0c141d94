"""make bench's own parts that need no engine: the distribution check's test, the summary page, the code stores."""

import json

import numpy as np

from benchmarks import bench


def _samples(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """`n` samples of one token per position, position q drawn from `probs[q]`."""
    return np.stack([rng.choice(len(p), size=n, p=p) for p in probs], axis=1)


def test_permutation_test_passes_one_distribution_and_fails_a_shifted_one():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(20), size=16)
    # At every position, 15% of the mass moves to the least likely token (a temperature error does about that).
    shifted = 0.85 * probs + 0.15 * np.eye(20)[probs.argmin(axis=1)]
    plain, same, other = (_samples(rng, p, 256) for p in (probs, probs, shifted))
    tv_same, p_same = bench.permutation_test(plain, same, 500)
    tv_other, p_other = bench.permutation_test(plain, other, 500)
    assert p_same > 0.01 and p_other < 0.01 and tv_other > tv_same
    # Identical sets are as close as any split can be.
    assert bench.permutation_test(plain, plain.copy(), 100) == (0.0, 1.0)


def test_summary_has_the_nucleus_table_and_the_distribution_check(tmp_path):
    replayed = [{"name": "suffix", "tokens_per_step": 1.5, "acceptance_rate": 0.3, "mean_acceptance_length": 1.8}]
    (tmp_path / "replay-humaneval.json").write_text(json.dumps({"methods": replayed}))
    sampled = [
        {"name": "vanilla", "tokens_per_s": 20.0, "speedup": 1.0, "repeats": 1, "spread": {"tokens_per_s": [20, 20]}},
        {"name": "suffix", "tokens_per_s": 24.0, "speedup": 1.2, "repeats": 1, "tokens_per_step": 1.3},
    ]
    (tmp_path / "nucleus-mt-bench").mkdir()
    body = {"prompts": {"prompts": 8}, "methods": sampled}
    (tmp_path / "nucleus-mt-bench" / "compare.json").write_text(json.dumps(body))
    result = {
        "dataset": "mt-bench", "prompts": 1, "samples": 4, "tokens": 2, "temperature": 0.7, "top_p": 0.95,
        "permutations": 10, "alpha": 0.01, "threshold": 0.01, "verdicts": {"dresd-ID+context": "pass"},
        "dresd_acceptance": {"drafts": 3, "draft_tokens": 9, "accepted_tokens": 2},
        "per_prompt": [{"prompt": 0, "against_plain": {"dresd-ID+context": {"mean_tv": 0.25, "p_value": 0.5}}}],
    }  # fmt: skip
    (tmp_path / "distribution-mt-bench.md").write_text(bench.distribution_table(result))
    text = bench.summary(tmp_path)
    sampled_table = text.split("## mt-bench, temperature 0.7, top-p 0.95 (chat stores)")[1]
    assert "| vanilla | 1.00 | - | - | - | 20.0 | 1.00 |" in sampled_table  # one round: no spread
    assert "| suffix | 1.30 | - | - | - | 24.0 | 1.20 |" in sampled_table
    assert "| dresd-ID+context | 0.250 (0.5000) | pass |" in text and "9 tokens in 3 drafts, 2 accepted" in text
    assert "## humaneval, greedy (code stores)" in text and "| suffix | 1.50 | 30.0% | 1.80 | - | - | - |" in text
    assert "first 8 prompts, median of 1 interleaved round(s)" in text


def test_code_stores_are_copied_from_make_demo_only_when_finished(tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    (demo / "dresd-id").mkdir(parents=True)
    (demo / "dresd-id" / "manifest.json").write_text("{}")
    (demo / "dresd-ood.partial").mkdir()  # still building
    (demo / "rest-id.npz").write_bytes(b"rest")
    monkeypatch.setattr(bench.demo, "BUILD", demo)
    work = tmp_path / "bench"
    work.mkdir()
    paths = {
        "ID": work / "code-dresd-id-400",
        "OOD": work / "code-dresd-ood-400",
        "REST": work / "code-rest-id-400.npz",
    }
    bench._copy_demo_stores(paths)
    assert (paths["ID"] / "manifest.json").read_text() == "{}" and paths["REST"].read_bytes() == b"rest"
    assert sorted(p.name for p in work.iterdir()) == ["code-dresd-id-400", "code-rest-id-400.npz"]


def test_serve_table_by_concurrency_and_in_the_summary(tmp_path):
    row = dict(requests=16, median_ttft_ms=240.4, median_tpot_ms=54.66)
    results = [
        dict(row, server="vanilla", concurrency=4, output_tokens_per_s=40.0, speedup=1.0, tokens_per_step=1.0,
             acceptance_rate=None),
        dict(row, server="suffix", concurrency=1, output_tokens_per_s=19.7, speedup=1.16, tokens_per_step=1.49,
             acceptance_rate=37.7),
    ]  # fmt: skip
    table = bench.serve_table(results)
    assert table.index("| suffix | 1 |") < table.index("| vanilla | 4 |")  # by concurrency
    assert "| suffix | 1 | 16 | 19.7 | 1.16 | 1.49 | 37.7% | 240 | 54.7 |" in table
    assert "| vanilla | 4 | 16 | 40.0 | 1.00 | 1.00 | - | 240 | 54.7 |" in table
    (tmp_path / "vllm-bench-serve.md").write_text(table)
    text = bench.summary(tmp_path)
    assert "`vllm bench serve` against each server" in text and table in text
