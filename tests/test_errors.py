"""Bad input and faults: each is refused early with a message that names it, or cannot change outputs.

Datastores with ids outside the vocabulary, a token store changed under a running engine, a proposer
that hands back a bad draft (its fault guard, on: the suite otherwise runs in strict mode), a bad
speculative config through a real engine (one smoke test: `test_config.py` checks every key without
one), more draft tokens than a datastore stores, a `.npy` given as a REST datastore, damaged JSONL, a
killed build's leftovers and unreadable build outputs.
"""

import gzip
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import GREEDY_MAX_TOKENS, K
from vllm import SamplingParams

from build_tools.data import InputError, load_rows
from dresd_vllm.config import DresdConfig, RestConfig
from dresd_vllm.store.manifest import Manifest
from dresd_vllm.store.projection import Projection
from dresd_vllm.store.writer import token_store_from_sequences, write_datastore

GREEDY = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS)


def dresd(datastore: str, **options) -> dict:
    return {"method": "dresd", "datastore": datastore, "num_speculative_tokens": K, **options}


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# --- ids outside the vocabulary ---


def test_datastore_with_out_of_vocabulary_ids_is_refused_at_start_up(tiny_model, own_datastore, llm_factory, tmp_path):
    damaged = Path(shutil.copytree(own_datastore, tmp_path / "ds"))
    vocab_size = json.loads((damaged / "manifest.json").read_text())["vocab_size"]
    store = np.load(damaged / "tokens.npy")
    store[len(store) // 2] = vocab_size + 3
    np.save(damaged / "tokens.npy", store)
    with pytest.raises(Exception, match=rf"tokens.npy: token ids must lie in \[0, vocab_size={vocab_size}\)"):
        llm_factory(tiny_model, speculative_config=dresd(str(damaged)))


def test_rest_datastore_with_out_of_vocabulary_ids_is_refused(tiny_model, llm_factory, tmp_path):
    from dresd_vllm.rest.suffix_array import write_rest_datastore

    path = write_rest_datastore(tmp_path / "rest.npz", [[1, 2, 3, 100_000]], {})
    config = {"method": "rest", "datastore": str(path), "num_speculative_tokens": K}
    with pytest.raises(Exception, match=r"holds token id 100000, outside the served model.s vocabulary \[0, 512\)"):
        llm_factory(tiny_model, speculative_config=config)


def test_proposer_handing_back_a_bad_draft_changes_no_output(
    tiny_model, prompts, plain_outputs, own_datastore, llm_factory, fault_guard
):
    llm = llm_factory(tiny_model, speculative_config=dresd(own_datastore))

    def inject(worker):
        drafter = worker.model_runner.drafter
        draft = drafter._draft

        def bad(sampled_token_ids, *args):
            drafts = draft(sampled_token_ids, *args)
            # Out of the vocabulary, negative, or one token too long, in turns.
            drafter.injected = getattr(drafter, "injected", 0) + 1
            first = drafts[0] if drafts[0] else [0]
            drafts[0] = [
                [*first, drafter.vocab_size + 7],
                [-3, *first],
                list(range(1, drafter.k + 2)),
            ][drafter.injected % 3]
            return drafts

        drafter._draft = bad

    llm.collective_rpc(inject)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == tokens(plain_outputs)
    (stats,) = llm.collective_rpc("dresd_stats")
    assert stats["faults"] == stats["steps"] > 0 and stats["draft_tokens"] == 0


def test_failing_hidden_state_capture_changes_no_output(
    tiny_model, prompts, plain_outputs, own_datastore, llm_factory, fault_guard
):
    llm = llm_factory(tiny_model, speculative_config=dresd(own_datastore))

    def inject(worker):
        def fail(*args):
            raise IndexError("injected")

        worker.model_runner.drafter.capture_hidden_states = fail

    llm.collective_rpc(inject)
    assert tokens(llm.generate(prompts[:4], GREEDY, use_tqdm=False)) == tokens(plain_outputs[:4])
    (stats,) = llm.collective_rpc("dresd_stats")
    assert stats["faults"] == stats["steps"] > 0


# --- the token store changed under a running engine ---


def test_token_store_changed_under_a_running_engine(
    tiny_model, prompts, plain_outputs, own_datastore, llm_factory, tmp_path
):
    store = Path(shutil.copytree(own_datastore, tmp_path / "ds"))
    llm = llm_factory(tiny_model, multiprocess=True, speculative_config=dresd(str(store)))
    assert tokens(llm.generate(prompts[:2], GREEDY, use_tqdm=False)) == tokens(plain_outputs[:2])
    # A truncation in place and a `cp` of another file over it (same inode): a memory-mapped store
    # would die of SIGBUS at the next gather from a page past the new end of the file.
    os.truncate(store / "tokens.npy", 0)
    with open(store / "offsets.npy", "wb") as f:
        f.write(b"\0" * 64)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == tokens(plain_outputs)
    (stats,) = llm.collective_rpc("dresd_stats")
    assert stats["faults"] == 0 and stats["draft_tokens"] > 0


# --- errors early and clear ---


def test_bad_config_fails_in_the_users_process_before_the_model_loads(tiny_model, own_datastore, llm_factory):
    # A multiprocess engine, as `vllm serve` runs: an error from the engine core would come back wrapped,
    # after the model loaded.
    with pytest.raises(ValueError) as error:
        llm_factory(tiny_model, multiprocess=True, speculative_config=dresd(own_datastore, top_k=-5))
    assert "dresd 'top_k' must be >= 1, got -5" in str(error.value)
    assert "VllmConfig" not in str(error.value)


def test_more_draft_tokens_than_the_datastore_stores_are_refused(tmp_path):
    config = DresdConfig.from_dict({"datastore": str(_small_datastore(tmp_path / "ds"))})
    config.check_speculative({"num_speculative_tokens": 4})
    with pytest.raises(ValueError, match=r"num_speculative_tokens=5 is more than the 4 tokens .* --n-next 5"):
        config.check_speculative({"num_speculative_tokens": 5})


def test_npy_given_as_rest_datastore(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(10, dtype=np.int32))
    with pytest.raises(ValueError, match=r"tokens.npy is a single NumPy array \(.npy\); a REST datastore is the .npz"):
        RestConfig.from_dict({"datastore": str(tmp_path / "tokens.npy")})


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"rows.jsonl:3: not UTF-8 text"):
        load_rows(str(path))


def test_truncated_gzip_names_file_and_last_good_line(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    rows = "".join(json.dumps({"a": "x" * (i % 7), "i": i}) + "\n" for i in range(2000))
    path.write_bytes(gzip.compress(rows.encode())[:-300])
    with pytest.raises(InputError, match=r"rows.jsonl.gz: unreadable after line \d+ .* truncated or damaged"):
        load_rows(str(path))


def _small_datastore(path: Path) -> Path:
    rng = np.random.default_rng(0)
    store, offsets = token_store_from_sequences([rng.integers(2, 50, size=40)], n_next=4, eos_id=1)
    states = rng.standard_normal((len(offsets), 32)).astype(np.float32)
    projection = Projection.fit(states, dim=8)
    manifest = Manifest(
        model="tiny", hidden_size=32, vocab_size=50, tokenizer_fingerprint=None, template="{prompt}",
        n_next=4, pca_dim=8, num_keys=len(offsets), index_factory="Flat",
    )  # fmt: skip
    return write_datastore(path, manifest, projection, projection.transform(states), store, offsets)


def test_next_write_removes_stale_temp_directories_of_killed_writes(tmp_path):
    dead = tmp_path / ".ds.tmp-12345678"  # a killed write (no process id: written before ids were recorded)
    gone = tmp_path / f".ds.old-{2**22 + 1}-0a1b2c3d"  # a process id above Linux's pid_max: not running
    alive = tmp_path / f".ds.tmp-{os.getpid()}-0a1b2c3d"  # a write still in progress
    other = tmp_path / ".other.tmp-12345678"  # another output's
    for d in (dead, gone, alive, other):
        d.mkdir()
        (d / "index.faiss").write_bytes(b"partial")
    _small_datastore(tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", alive.name, other.name])


def test_build_outputs_are_readable_by_other_users(tmp_path):
    umask = os.umask(0o022)
    try:
        path = _small_datastore(tmp_path / "ds")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.iterdir()]}
    assert modes == {"ds": 0o755, **{p.name: 0o644 for p in path.iterdir()}}
