"""dresd_vllm.patches: the registry (a log line per patch, idempotence, the DRESD_VLLM_PATCHES switch),
the guards that refuse an unsupported vLLM, the benchmark's proposer timer, and the row arithmetic
that picks each request's verified hidden states out of the batch's sampled positions."""

import functools
import json
import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import vllm
from conftest import ENGINE_DEFAULTS, K
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms import current_platform
from vllm.platforms.cpu import CpuPlatform
from vllm.utils import cpu_triton_utils
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.worker_base import WorkerBase

from dresd_vllm import patches, plugin


@pytest.fixture
def unapplied(monkeypatch):
    """Patches as if not yet applied in this process; what a test changes is restored after it."""
    for owner, name in (
        (EngineArgs, "create_speculative_config"),
        (GPUModelRunner, "propose_draft_token_ids"),
        (WorkerBase, "dresd_stats"),
        (CpuPlatform, "register_triton_kernel_overrides"),
    ):
        if name in vars(owner):
            monkeypatch.setattr(owner, name, vars(owner)[name])
    monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", cpu_triton_utils._expand_kernel_impl)
    monkeypatch.setattr(patches, "_applied", set())
    monkeypatch.delenv(patches.SWITCH, raising=False)


@pytest.fixture
def patch_log():
    """The lines dresd_vllm.patches logs (vLLM's logger tree does not propagate to pytest's handler)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = patches.logger.level
    patches.logger.addHandler(handler)
    patches.logger.setLevel(logging.INFO)  # as vLLM's logging configuration sets it where vLLM runs
    yield lines
    patches.logger.removeHandler(handler)
    patches.logger.setLevel(level)


def test_a_log_line_per_patch_and_none_when_applied_again(unapplied, patch_log):
    patches.apply()
    made = [p for p in patches.PATCHES.values() if not p.per_runner]
    logged = [p for p in made if current_platform.is_cpu() or p.name != "cpu_kernel_overrides"]
    assert patch_log == [f"dresd-vllm: patched {p.target} ({p.name})" for p in logged]
    assert patches._applied == {p.name for p in made}
    patches.apply()
    assert len(patch_log) == len(logged)


def test_switch_off_leaves_vllm_unpatched_and_refuses_dresd(unapplied, patch_log, monkeypatch):
    monkeypatch.setenv(patches.SWITCH, "0")
    propose = GPUModelRunner.propose_draft_token_ids
    patches.apply()
    assert GPUModelRunner.propose_draft_token_ids is propose and not patches._applied
    assert any("DRESD_VLLM_PATCHES=0: vLLM is left unpatched" in line for line in patch_log)
    with pytest.raises(RuntimeError, match=r"^dresd needs .*propose_draft_token_ids .*DRESD_VLLM_PATCHES=0 .*unset"):
        patches.require("dresd", "capture_hidden_states")


def test_switch_off_stops_a_dresd_engine_naming_the_variable(tiny_model, llm_factory, monkeypatch, tmp_path):
    """The plugin-free form reaches the proposer even with the switch off; the proposer refuses to start."""
    monkeypatch.setenv(patches.SWITCH, "0")
    with pytest.raises(RuntimeError, match="DRESD_VLLM_PATCHES=0"):
        llm_factory(
            tiny_model,
            speculative_config={"method": "custom_class", "model": "dresd_vllm.spec.proposer.DresdProposer",
                                "num_speculative_tokens": K},
            additional_config={"dresd": {"datastore": str(tmp_path)}},
        )  # fmt: skip


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0"])
def test_unsupported_vllm_version_logs_once_patches_only_the_method_keys(unapplied, patch_log, monkeypatch, version):
    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.setattr(patches, "_log_unsupported", functools.cache(patches._log_unsupported.__wrapped__))
    propose = GPUModelRunner.propose_draft_token_ids
    patches.apply()
    patches.apply()  # never raises, and logs once
    message = rf"^dresd-vllm supports vllm >= 0.32, < 0.34; vllm {version} is installed, so vLLM runs unpatched"
    assert len(patch_log) == 1 and re.match(message, patch_log[0])
    assert patches._applied == {"speculative_methods"} and GPUModelRunner.propose_draft_token_ids is propose
    with pytest.raises(RuntimeError, match=message):
        patches.require("dresd", "capture_hidden_states")
    # The method keys refuse DReSD and REST with the reason and leave vLLM's own methods alone.
    for method in ("dresd", "rest"):
        with pytest.raises(RuntimeError, match=message):
            EngineArgs(model="m", speculative_config={"method": method, "datastore": "d"}).create_speculative_config(
                None, None
            )
    args = EngineArgs(model="m", speculative_config={"method": "ngram"})
    with pytest.raises(Exception) as raised:  # vLLM's own handling (no model config given here), not ours
        args.create_speculative_config(None, None)
    assert "dresd-vllm" not in str(raised.value) and args.speculative_config["method"] == "ngram"


def test_changed_propose_signature_is_refused(unapplied, patch_log, monkeypatch):
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids):
        raise AssertionError("never called")

    monkeypatch.setattr(GPUModelRunner, "propose_draft_token_ids", propose_draft_token_ids)
    monkeypatch.setattr(patches, "_log_unsupported", functools.cache(patches._log_unsupported.__wrapped__))
    patches.apply()
    assert len(patch_log) == 1 and "is not the signature dresd-vllm patches" in patch_log[0]
    assert GPUModelRunner.propose_draft_token_ids is propose_draft_token_ids  # nothing was patched
    with pytest.raises(RuntimeError, match=r"is not the signature dresd-vllm patches"):
        patches.require("dresd", "capture_hidden_states")


def test_plugin_register_never_raises(unapplied, patch_log, monkeypatch):
    def broken() -> None:
        raise ValueError("a patch that fails")

    monkeypatch.setitem(patches.PATCHES, "broken", patches.Patch("broken", "nothing", broken))
    plugin.register()
    assert any("patching vLLM failed" in line for line in patch_log)


def test_apply_is_idempotent():
    patches.apply()
    patched = (EngineArgs.create_speculative_config, GPUModelRunner.propose_draft_token_ids)
    patches.apply()
    assert (EngineArgs.create_speculative_config, GPUModelRunner.propose_draft_token_ids) == patched
    # Wrapped once: the wrapper's wrapped function is vLLM's own.
    assert patched[1].__code__.co_filename == patches.serving.__file__
    assert patched[1].__wrapped__.__code__.co_filename.endswith("vllm/v1/worker/gpu_model_runner.py")


def _rows(sampled_token_ids, num_draft_tokens):
    metadata = None if num_draft_tokens is None else SimpleNamespace(num_draft_tokens=num_draft_tokens)
    total = len(sampled_token_ids) if num_draft_tokens is None else sum(n + 1 for n in num_draft_tokens)
    states = torch.arange(total, dtype=torch.float32)[:, None].repeat(1, 3)  # row r holds r
    picked = patches.verified_states(states, sampled_token_ids, metadata)
    assert picked.shape == (sum(map(len, sampled_token_ids)), 3)
    return picked[:, 0].long().tolist()


@pytest.mark.parametrize(
    ("sampled", "num_draft_tokens", "rows"),
    [
        ([[5], [6], [7]], None, [0, 1, 2]),  # no drafts: one row per request
        ([[5, 6], [7], [8, 9, 1, 2]], [2, 0, 3], [0, 1, 3, 4, 5, 6, 7]),  # 3, 1, 4 rows; first len(sampled) verified
        ([[5], [6, 7, 8], [9]], [3, 2, 1], [0, 4, 5, 6, 7]),  # a request rejecting its whole draft keeps one row
        ([[], [6, 7]], [1, 1], [2, 3]),  # a request with nothing sampled (discarded) gives no row
        ([], [], []),
    ],
)
def test_verified_states_picks_each_requests_verified_rows(sampled, num_draft_tokens, rows):
    assert _rows(sampled, num_draft_tokens) == rows


# A process without the plugin: nothing patches vLLM at import, so the proposer must apply the patches itself.
_PLUGIN_FREE = """
import json, sys
from vllm import LLM, SamplingParams
model, datastore, prompts, engine = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
llm = LLM(model=model, **engine, additional_config={"dresd": {"datastore": datastore}}, speculative_config={
    "method": "custom_class", "model": "dresd_vllm.spec.proposer.DresdProposer", "num_speculative_tokens": 4})
llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
print(json.dumps({"stats": llm.collective_rpc("dresd_stats")[0], "plugin": "dresd_vllm.plugin" in sys.modules}))
"""


def test_plugin_free_process_gets_the_patches_from_the_proposer(tiny_model, prompts, own_datastore):
    env = {**os.environ, "VLLM_PLUGINS": "none", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    args = [tiny_model, own_datastore, json.dumps(prompts[:2]), json.dumps(ENGINE_DEFAULTS)]
    run = subprocess.run(
        [sys.executable, "-c", _PLUGIN_FREE, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["plugin"] is False
    # Without the hidden-state capture every step would be a fault without drafts.
    assert result["stats"]["faults"] == 0 and result["stats"]["draft_tokens"] > 0


def test_proposer_timer_counts_steps_and_wraps_a_runner_once(tiny_model, prompts, llm_factory):
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    llm = llm_factory(tiny_model, speculative_config=ngram)
    for _ in range(2):
        llm.collective_rpc(patches.apply_to_runner, args=("proposer_timer",))
    (wrapped,) = llm.collective_rpc(lambda worker: worker.model_runner.propose_draft_token_ids.__wrapped__)
    assert wrapped.__func__ is GPUModelRunner.propose_draft_token_ids  # the class's own, wrapped once
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    ((steps, seconds, request_steps),) = llm.collective_rpc(patches.read_proposer_timer)
    # Batch 2 at first: more request steps than drafter calls, which run once per step.
    assert 0 < steps < request_steps <= 2 * 16 and seconds > 0
    with pytest.raises(ValueError, match=r"apply\(\) makes it"):
        patches.apply_to_runner(None, "capture_hidden_states")


class _V2Runner:
    """What `proposer_timer` touches of vLLM 0.33's model runner V2 (`vllm/v1/worker/gpu/model_runner.py`),
    which needs CUDA: `execute_model(scheduler_output, ..., dummy_run=False)`, `device`, and a speculator whose
    `propose(input_batch, ..., dummy_run=False)` drafts; there is no `propose_draft_token_ids`."""

    def __init__(self, speculator: bool = True):
        self.device = torch.device("cpu")
        self.proposed: list[bool] = []
        if speculator:
            self.speculator = SimpleNamespace(propose=self._propose)

    def _propose(self, input_batch, *args, dummy_run: bool = False, **kwargs):
        self.proposed.append(dummy_run)
        return torch.zeros(len(input_batch), 2, dtype=torch.long)

    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run: bool = False):
        return len(scheduler_output.num_scheduled_tokens)


def _steps(runner, batch: int) -> None:
    scheduler_output = SimpleNamespace(num_scheduled_tokens={f"r{i}": 1 for i in range(batch)})
    assert runner.execute_model(scheduler_output) == batch
    assert runner.speculator.propose([0] * batch, None).shape == (batch, 2)


def test_proposer_timer_clocks_a_v2_runners_speculator():
    runner = _V2Runner()
    worker = SimpleNamespace(model_runner=runner)
    assert patches.proposer_timer(runner) is True and patches.proposer_timer(runner) is False
    _steps(runner, 3)
    _steps(runner, 2)
    runner.execute_model(SimpleNamespace(num_scheduled_tokens={"w": 1}), dummy_run=True)  # warm-up: not counted
    runner.speculator.propose([0], None, dummy_run=True)
    steps, seconds, request_steps = patches.read_proposer_timer(worker)
    assert (steps, request_steps) == (2, 5) and seconds > 0 and runner.proposed == [False, False, True]


def test_proposer_timer_counts_steps_of_a_runner_without_a_drafter_call(patch_log):
    runner = _V2Runner(speculator=False)
    assert patches.proposer_timer(runner) is True
    assert runner.execute_model(SimpleNamespace(num_scheduled_tokens={"a": 1, "b": 2})) == 2
    assert patches.read_proposer_timer(SimpleNamespace(model_runner=runner)) == (0, 0.0, 2)
    assert any("cannot time its drafter" in line for line in patch_log)
