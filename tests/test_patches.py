"""dresd_vllm.patches: the guards that refuse an unsupported vLLM, idempotence, and the row arithmetic
that picks each request's verified hidden states out of the batch's sampled positions."""

from types import SimpleNamespace

import pytest
import torch
import vllm
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.worker_base import WorkerBase

from dresd_vllm import patches


@pytest.fixture
def unapplied(monkeypatch):
    """Patches as if not yet applied in this process; what a test changes is restored after it."""
    for owner, name in (
        (EngineArgs, "create_speculative_config"),
        (GPUModelRunner, "propose_draft_token_ids"),
        (WorkerBase, "dresd_stats"),
    ):
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setattr(patches, "_applied", set())


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0"])
def test_unsupported_vllm_version_is_refused(unapplied, monkeypatch, version):
    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"supports vllm >= 0.32, < 0.34; vllm {version} is installed"):
        patches.apply()
    assert not patches._applied


def test_changed_propose_signature_is_refused(unapplied, monkeypatch):
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids):
        raise AssertionError("never called")

    monkeypatch.setattr(GPUModelRunner, "propose_draft_token_ids", propose_draft_token_ids)
    with pytest.raises(RuntimeError, match=r"is not the signature dresd-vllm patches"):
        patches.apply()
    assert GPUModelRunner.propose_draft_token_ids is propose_draft_token_ids  # nothing was patched


def test_apply_is_idempotent():
    patches.apply()
    patched = (EngineArgs.create_speculative_config, GPUModelRunner.propose_draft_token_ids)
    patches.apply()
    assert (EngineArgs.create_speculative_config, GPUModelRunner.propose_draft_token_ids) == patched
    # Wrapped once: the wrapper's wrapped function is vLLM's own.
    assert patched[1].__code__.co_filename == patches.__file__
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
