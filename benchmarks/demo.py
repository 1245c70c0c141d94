"""`make demo`: DReSD against every other speculative method on SmolLM2-135M-Instruct, end to end.

1. `dresd-build datastore`, twice and side by side (vLLM runs a model on one core, the machine has
   two): the ID datastore over the shipped ID corpus (SmolLM2's own answers to training prompts,
   `dresd_assets.DEFAULT_ID_CORPUS`, generated once by `python -m build_tools.embedded.id_corpus`)
   and the OOD one over the corpus's real answers to the same prompts;
2. `dresd-build rest`: REST's suffix array over the ID corpus, the same data as DReSD-ID's;
3. `dresd-bench compare`: every method on held-out prompts, with SmolLM2's distilled draft model as
   `draft_model`; a table, JSON and PNG charts.

Every engine runs in fp32 (`build_tools/smollm2.py` says why). Built datastores live under
`build/demo/` and are reused by the next run (each build skips finished work); the results go to
`results/demo/`. The sizes below fit the whole of `make demo` (install included) into 25 minutes on
a quiet 2-core machine.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from dresd_assets import DEFAULT_DATASET, DEFAULT_ID_CORPUS, check_default_model

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "demo"
RESULTS = ROOT / "results" / "demo"
ENGINE_ARGS = json.dumps({"dtype": "float32"})
# Sizes, for 25 minutes of `make demo` on a quiet 2-core machine (install ~4 min): the two datastores
# take about 6 minutes side by side (embedding runs at a few hundred tokens/s on one core), and the
# comparison, 9 methods x 3 interleaved rounds at one engine start each (~10 s for SmolLM2), about 13,
# with vanilla decoding at ~27 tok/s. Datastore prompts: the first STORE_PROMPTS training prompts,
# answered by SmolLM2 (ID, from the shipped ID corpus) or by the corpus (OOD); 600 instead of 400 moved
# DReSD's tokens per step by only 2-3% (replay), for half again the build time.
STORE_PROMPTS = 400
PCA_SAMPLE = 10_000  # states the projection is fitted on (the build's default, 100k, takes minutes here)
EVAL_PROMPTS = 8  # held-out prompts of the comparison
MAX_TOKENS = 96
# Rounds of every method, interleaved so that drift in the machine's speed hits every method alike; the
# table gives each method's median tokens/s with its range. Tokens per step does not depend on timing.
REPEATS = 3
PROGRESS_EVERY_S = 30  # how often each running build's progress line is printed


def _command(*args: str) -> list[str]:
    print(f"$ {' '.join(args)}", flush=True)
    return [sys.executable, "-m", *args]


def last_progress(log: Path, width: int = 100) -> str:
    """The last progress-bar state or line a build wrote to `log` (tqdm redraws with carriage returns)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if line.strip()]
    return lines[-1][:width] if lines else ""


def _run_parallel(builds: dict[str, list[str]]) -> None:
    """Run `builds` side by side, each logging to its own file; fail if any fails.

    The terminal gets one line per build every PROGRESS_EVERY_S seconds (its progress bar's last state)
    and one when it ends; the full output is in the log.
    """
    procs = {}
    for i, (name, command) in enumerate(builds.items()):
        path = BUILD / f"build-{i}.log"
        log = open(path, "w")  # closed below, once the process is done
        procs[name] = (subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log, path)
        print(f"{name}: started, full log in {path.relative_to(ROOT)}", flush=True)
    start = last_report = time.perf_counter()
    running, failed = dict(procs), []
    while running:
        time.sleep(1)
        now = time.perf_counter()
        minutes = "[{}:{:02d}]".format(*divmod(int(now - start), 60))
        report = now - last_report >= PROGRESS_EVERY_S
        for name, (proc, log, path) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode == 0:
                    print(f"{name} {minutes}: done", flush=True)
                else:
                    failed.append(f"{name} (exit {proc.returncode}): {last_progress(path)}; log: {path}")
            elif report and (line := last_progress(path)):
                print(f"{name} {minutes}: {line}", flush=True)
        if report:
            last_report = now
    if failed:
        sys.exit("make demo: failed:\n  " + "\n  ".join(failed))


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines start in seconds
    try:
        check_default_model()
    except FileNotFoundError as e:
        sys.exit(f"make demo: {e}")
    BUILD.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sizes = ("--limit", str(STORE_PROMPTS), "--pca-sample", str(PCA_SAMPLE), "--engine-args", ENGINE_ARGS)
    datastores = {"ID": (DEFAULT_ID_CORPUS, "output"), "OOD": (DEFAULT_DATASET.train, "response")}
    builds = {
        f"datastore {name}": _command(
            "build_tools.cli", "datastore", "--dataset", dataset, "--response-key", key,
            "--out", str(BUILD / f"dresd-{name.lower()}"), *sizes,
        )
        for name, (dataset, key) in datastores.items()
    }  # fmt: skip
    rest = BUILD / "rest-id.npz"
    if not rest.is_file():
        limit = ("--limit", str(STORE_PROMPTS))
        builds["rest ID"] = _command("build_tools.cli", "rest", "--dataset", DEFAULT_ID_CORPUS, "--response-key",
                                     "output", "--prompt-key", "instruction", *limit, "--out", str(rest))  # fmt: skip
    _run_parallel(builds)  # a finished datastore is not built again
    built = time.perf_counter() - start
    print(f"datastores: {built:.0f} s", flush=True)
    compare = _command(
        "benchmarks.cli", "compare", "--limit", str(EVAL_PROMPTS), "--max-tokens", str(MAX_TOKENS),
        "--repeats", str(REPEATS), "--out", str(RESULTS),
        "--datastore", f"ID={BUILD / 'dresd-id'}", "--datastore", f"OOD={BUILD / 'dresd-ood'}",
        "--rest-datastore", str(rest),
    )  # fmt: skip
    code = subprocess.run(compare, cwd=ROOT).returncode
    print(f"\nmake demo: {time.perf_counter() - start:.0f} s (datastores {built:.0f} s); results in {RESULTS}")
    sys.exit(code)


if __name__ == "__main__":
    main()
