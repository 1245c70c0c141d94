#!/usr/bin/env bash
# The GPU check of the torch search path, in one go (see benchmarks/gpu_check.py): TorchIVF, exact search
# and a full online store at 1M and 10M synthetic keys, batch 1/16/64. Needs a python with a CUDA torch and
# NumPy only: no vLLM, no FAISS, no network. Extra flags go to the script; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check --device cuda --keys 1000000,10000000 --batch-sizes 1,16,64 \
    --out results/gpu_check.json "$@"
