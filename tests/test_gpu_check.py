"""The GPU check's tiny CPU mode runs without FAISS or vLLM, and its host-wait counter sees what it should."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.gpu_check import HostWaits

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_cpu_mode_runs_without_faiss_or_vllm(tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--keys", "20000", "--batch-sizes", "1,4", "--iters", "3", "--warmup", "1"]
    argv += ["--online-keys", "2000", "--recall-queries", "32", "--out", str(out)]
    # What the GPU machine lacks is made unimportable: the check must not need it.
    code = "import sys; sys.modules.update(faiss=None, vllm=None); from benchmarks import gpu_check; "
    code += f"sys.exit(gpu_check.main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["keys"] == 20000 and result["nlist"] == 512 and result["recall@50"] > 0.9
    assert 0.9 * 2000 < result["online"]["keys"] <= 2000  # lists that fill first drop their oldest keys
    for name in ("torch-ivf", "torch", "online"):
        for batch in ("1", "4"):
            r = result["latency"][name][batch]
            assert 0 < r["p50_ms"] <= r["p99_ms"]
            assert r["host_wait_ops_per_step"] == 0 and r["copies_per_step"] == 1, (name, batch, r)


def test_host_waits_counts_reads_of_device_data_and_data_dependent_shapes():
    x = torch.arange(6.0)
    with HostWaits() as waits:
        bool(x.sum() > 0)
        x[x > 2]
        torch.nonzero(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        x[torch.tensor([0, 2])]  # an index tensor: no wait
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        torch.topk(x, 2)
    assert waits.ops == ["_local_scalar_dense", "index", "nonzero", "repeat_interleave"]
