"""A tiny configuration of the retrieval benchmark: it times the served step, and its JSON holds every figure."""

import json

import faiss
import torch

from benchmarks import retrieval


def test_tiny_benchmark_writes_its_report(tmp_path, capsys):
    threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    out = tmp_path / "retrieval.json"
    argv = ["--num-keys", "1500", "--batch-sizes", "1,3", "--factory", "IVF8,Flat", "--nprobe", "2,8"]
    argv += ["--hidden-size", "64", "--pca-dim", "16", "--queries", "40", "--iters", "4", "--warmup", "1"]
    argv += ["--online-keys", "off,0,400", "--online-capacity", "300"]  # steps of the three drafters interleaved
    argv += ["--work-dir", str(tmp_path), "--out", str(out)]
    assert retrieval.main(argv) == 0
    assert (faiss.omp_get_max_threads(), torch.get_num_threads()) == threads  # restored after --threads 1

    report = json.loads(out.read_text())
    assert report["config"]["num_keys"] == [1500] and report["machine"]["cores"] >= 1
    assert report["threads"] == {"faiss": 1, "torch": 1}
    # Per nprobe: no online store, an empty one, a full one.
    low_off, low, low_full, high_off, high, high_full = report["results"]
    assert [r["online_keys"] for r in report["results"]] == [0, 0, 400] * 2
    assert [r["online_store"] for r in report["results"]] == [False, True, True] * 2
    assert (low["nprobe"], high["nprobe"]) == (2, 8) and high["index_factory"] == "IVF8,Flat"
    assert 0.0 < low["recall@50"] <= high["recall@50"] == 1.0  # probing all 8 lists is exact
    assert 0.0 < high["self_mrr"] <= 1.0
    for result in report["results"]:
        assert result["backend"] == "faiss" and result["device"] == "cpu"
        assert set(result["disk_bytes"]) == {
            "manifest.json",
            "projection.safetensors",
            "index.faiss",
            "tokens.npy",
            "offsets.npy",
        }
        assert result["bytes_per_key_disk"] > result["bytes_per_key_memory"] > 16 * 4  # fp32 vectors + ids
        assert result["bytes_per_key_server"] == result["bytes_per_key_memory"] + 4  # int32 offsets
        assert {"generate_s", "train_s", "add_s", "write_s"} <= set(result["build_s"])
        assert result["load_s"] > 0 and result["peak_rss_mb_build"] > 0
        assert set(result["latency"]) == {"1", "3"}
        for latency in result["latency"].values():
            assert 0 < latency["p50_ms"] <= latency["p99_ms"] and 0 < latency["cpu_p50_ms"] <= latency["cpu_p99_ms"]
            assert latency["search_ms"] > 0 and latency["draft_tokens_per_request"] > 0
            assert set(latency["stages"]) == set(retrieval.STAGES)
            for name in ("projection", "search", "merge", "context", "score") + ("online_search",) * result[
                "online_store"
            ]:
                stage = latency["stages"][name]
                assert 0 < stage["p50_ms"] <= stage["p99_ms"] <= latency["p99_ms"], name
    for full in (low_full, high_full):  # 400 keys into a store of 300: full, and it stays full
        assert all(lat["online_keys_after"] == 300 for lat in full["latency"].values())
    assert low["latency"]["1"]["online_keys_after"] == 4 + 1  # warmup + timed steps, one key each
    assert low_off["latency"]["1"]["stages"]["online_search"]["p99_ms"] == 0  # no store, no online search
    assert "| keys |" in (tmp_path / "retrieval.md").read_text()
    printed = capsys.readouterr().out
    assert "p50 ms" in printed and f"wrote {out}, {tmp_path / 'retrieval.md'}" in printed


def test_work_dir_keeps_the_datastore_and_a_rerun_only_loads_it(tmp_path, capsys):
    """A store kept in --work-dir is reused by a run with the same build settings, rebuilt for other ones."""
    work = tmp_path / "work"
    argv = ["--num-keys", "2000", "--batch-sizes", "1", "--factory", "IVF8,Flat", "--nprobe", "8"]
    argv += ["--hidden-size", "64", "--pca-dim", "16", "--queries", "20", "--iters", "2", "--warmup", "1"]
    argv += ["--work-dir", str(work)]

    def run(*extra: str) -> dict:
        out = tmp_path / f"run{len(list(tmp_path.glob('run*.json')))}.json"
        assert retrieval.main([*argv, *extra, "--out", str(out)]) == 0
        return json.loads(out.read_text())["results"][0]

    first = run()
    record = json.loads((work / "datastore-2000.json").read_text())
    assert record["settings"]["factory"] == "IVF8,Flat" and first["build_s"]["add_s"] == record["build_s"]["add_s"]
    built = (work / "datastore-2000" / "index.faiss").stat().st_mtime_ns
    assert not first["reused_build"] and "generating and building" in capsys.readouterr().out

    again = run("--batch-sizes", "1,2", "--queries", "30")  # measuring settings only: no rebuild
    assert again["reused_build"] and "reusing" in capsys.readouterr().out
    assert (work / "datastore-2000" / "index.faiss").stat().st_mtime_ns == built
    assert again["build_s"] == first["build_s"] and again["peak_rss_mb_build"] == first["peak_rss_mb_build"]
    assert again["recall@50"] == 1.0 and set(again["latency"]) == {"1", "2"}  # keys read back for exact search

    other = run("--spread", "3.0")  # a build setting changed: built again, and recorded
    assert not other["reused_build"] and "spread: 2.0 then, 3.0 now" in capsys.readouterr().out
    assert json.loads((work / "datastore-2000.json").read_text())["settings"]["spread"] == 3.0
    assert sorted(p.name for p in work.iterdir()) == [
        "datastore-2000",
        "datastore-2000.json",
        "datastore-2000.keys.npy",
    ]


def test_torch_ivf_backend_on_pq_codes(tmp_path):
    """The GPU path's backend, measured on the CPU: same recall as FAISS on the same index."""
    out = tmp_path / "retrieval.json"
    argv = ["--num-keys", "3000", "--batch-sizes", "1", "--factory", "IVF16,PQ8", "--nprobe", "4"]
    argv += ["--hidden-size", "64", "--pca-dim", "16", "--queries", "40", "--iters", "3", "--warmup", "1"]
    for backend in ("faiss", "torch-ivf"):
        assert retrieval.main([*argv, "--backend", backend, "--out", str(out.with_suffix(f".{backend}"))]) == 0
    faiss_run, torch_run = (
        json.loads(out.with_suffix(f".{b}").read_text())["results"][0] for b in ("faiss", "torch-ivf")
    )
    assert torch_run["backend"] == "torch-ivf" and torch_run["nprobe"] == 4
    assert abs(torch_run["recall@50"] - faiss_run["recall@50"]) < 0.01
    assert torch_run["bytes_per_key_memory"] < faiss_run["bytes_per_key_memory"]  # 4-byte ids instead of 8
