"""The online store's spool: whole chunks or none, bounded, checked, reloaded, refused across projections."""

import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import BUILD_MAX_LENGTH

from build_tools.build import run_datastore
from build_tools.cli import parse_args
from build_tools.data import InputError
from dresd_vllm.config import DresdConfig
from dresd_vllm.online.spool import INFO, SpoolError, chunk_files, projection_id, read_spool
from dresd_vllm.online.spool_writer import SpoolWriter
from dresd_vllm.spec.drafting import Drafter
from dresd_vllm.store.datastore import Datastore

DIM, N_NEXT, EOS = 4, 3, 0


@pytest.fixture
def spool_log():
    """The spool's warnings (its logger sits under vLLM's, which need not propagate to pytest's handler)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.dresd_vllm.online.spool")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def two_requests(writer: SpoolWriter, steps: int = 12) -> dict[int, list[int]]:
    """Requests 7 and 9 interleaved, 1-2 tokens a step each, as a drafter spools them; their tokens by tag."""
    rng = np.random.default_rng(0)
    produced: dict[int, list[int]] = {7: [], 9: []}
    start = {7: 10, 9: 30}  # prompt lengths: positions start there
    for _ in range(steps):
        for tag in (7, 9):
            count = int(rng.integers(1, 3))
            first = start[tag] + len(produced[tag])
            tokens = rng.integers(1, 100, count).astype(np.int32)
            positions = np.arange(first, first + count)
            keys = torch.from_numpy(np.c_[np.full((count, 1), tag), positions[:, None], np.zeros((count, DIM - 2))])
            writer.append(keys.half(), tokens, positions, np.full(count, tag))
            produced[tag] += tokens.tolist()
    return produced


def test_spool_round_trip_joins_each_keys_value_across_chunks(tmp_path):
    writer = SpoolWriter(tmp_path, "sha256:p", DIM, max_bytes=1 << 30, chunk_rows=5, queued=1000)
    produced = two_requests(writer)
    writer.close()
    assert len(chunk_files(tmp_path)) > 3 and json.loads((tmp_path / INFO).read_text())["projection"] == "sha256:p"

    spooled = read_spool(tmp_path, "sha256:p")
    assert len(spooled.keys) == sum(map(len, produced.values())) == writer.written_rows
    values = spooled.values(N_NEXT)
    for key, value in zip(spooled.keys.astype(int), values, strict=True):
        tag, position = key[0], key[1]
        seq = produced[tag][position - (10 if tag == 7 else 30) :]
        want = (seq + [-1] * N_NEXT)[: N_NEXT + 1]
        assert value.tolist() == want
    # As a datastore's token store: each key's value is the same, EOS where the request's rows end.
    keys, tokens, offsets = spooled.token_store(N_NEXT, EOS)
    stored = tokens[offsets[:, None] + 1 + np.arange(N_NEXT + 1)]
    padded = np.where(values < 0, EOS, values)
    by_key = {tuple(k): v for k, v in zip(spooled.keys.astype(int).tolist(), padded, strict=True)}
    for key, value in zip(keys.astype(int).tolist(), stored, strict=True):
        assert value.tolist() == by_key[tuple(key)].tolist()
    assert len(tokens) < len(keys) * (N_NEXT + 1)  # a token a key, plus a run's padding

    # The newest rows only: the last chunks, which hold the newest keys' followers too.
    newest = read_spool(tmp_path, "sha256:p", max_rows=6)
    assert 6 <= len(newest.keys) < len(spooled.keys) and newest.chunks == spooled.chunks[-len(newest.chunks) :]


def test_spool_is_bounded_and_a_partial_chunk_waits_at_most_flush_s(tmp_path):
    writer = SpoolWriter(tmp_path, "sha256:p", DIM, max_bytes=1500, chunk_rows=4, queued=1000)
    two_requests(writer, steps=40)
    writer.close()
    files = chunk_files(tmp_path)
    assert sum(f.stat().st_size for f in files) <= 1500 and len(files) >= 2
    assert read_spool(tmp_path, "sha256:p").keys[-1, 0] in (7, 9)  # the newest rows survive

    # A chunk that has waited flush_s is written while the server idles, before it fills.
    timed = SpoolWriter(tmp_path / "timed", "sha256:p", DIM, max_bytes=1 << 30, chunk_rows=1000, flush_s=0.2)
    timed.append(torch.zeros((2, DIM), dtype=torch.float16), np.array([1, 2]), np.array([5, 6]), np.array([1, 1]))
    deadline = time.monotonic() + 30
    while not chunk_files(tmp_path / "timed") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(chunk_files(tmp_path / "timed")) == 1
    timed.append(torch.zeros((1, DIM), dtype=torch.float16), np.array([3]), np.array([7]), np.array([1]))
    timed.close()
    assert len(chunk_files(tmp_path / "timed")) == 2 and len(read_spool(tmp_path / "timed", "sha256:p").keys) == 3


def test_damaged_chunks_are_skipped_with_a_warning(tmp_path, spool_log):
    writer = SpoolWriter(tmp_path, "sha256:p", DIM, max_bytes=1 << 30, chunk_rows=5, queued=1000)
    two_requests(writer)
    writer.close()
    files = chunk_files(tmp_path)
    whole = len(read_spool(tmp_path, "sha256:p").keys)
    torn, flipped = files[1], files[2]
    torn.write_bytes(torn.read_bytes()[:-7])  # a copy cut short
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF  # a bit gone bad on disk
    flipped.write_bytes(bytes(data))
    (tmp_path / "00000000000000000000-junk.chunk").write_bytes(b"not a chunk")
    left = read_spool(tmp_path, "sha256:p")
    assert len(left.keys) == whole - 10  # two chunks of 5 rows skipped, the rest read
    warned = " ".join(r.getMessage() for r in spool_log)
    assert "payload of" in warned and "checksum mismatch" in warned and "not a spool chunk" in warned
    assert torn.name not in left.chunks and flipped.name not in left.chunks


def test_a_spool_of_another_projection_is_refused(tmp_path):
    SpoolWriter(tmp_path, "sha256:a", DIM, max_bytes=1 << 30).close()
    with pytest.raises(SpoolError, match=r"another projection \(sha256:a\) than this datastore's \(sha256:b\)"):
        SpoolWriter(tmp_path, "sha256:b", DIM, max_bytes=1 << 30)
    with pytest.raises(SpoolError, match="delete this one to start over"):
        read_spool(tmp_path, "sha256:b")
    assert len(read_spool(tmp_path / "none", "sha256:b").keys) == 0  # no spool yet: nothing to reload


def test_spool_keys_are_checked_in_the_config(own_datastore, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        DresdConfig.from_dict({"datastore": own_datastore, "online_store_path": str(tmp_path / "file")})
    with pytest.raises(ValueError, match="needs 'online_store': true"):
        DresdConfig.from_dict({"datastore": own_datastore, "online_store_path": str(tmp_path), "online_store": False})
    with pytest.raises(ValueError, match="online_store_spool_bytes"):
        DresdConfig.from_dict({"datastore": own_datastore, "online_store_spool_bytes": 0})


def serve(drafter: Drafter, req: str, tokens: np.ndarray, states: torch.Tensor, start: int, k: int = 8) -> float:
    """Run one request through `drafter` as vLLM's greedy loop would (its output is `tokens` past `start`);
    tokens per step. `states[p]` is the state that produced token p."""
    n, sampled, steps = start + 1, [int(tokens[start])], 1
    row = tokens[None, :]
    while n < len(tokens) - k:
        verified = states[n - len(sampled) : n]
        (draft,) = drafter.step([req], [sampled], np.array([n]), row, verified, np.array([k]))
        hit = int(np.logical_and.accumulate(np.asarray(draft) == tokens[n : n + len(draft)]).sum()) if draft else 0
        sampled = tokens[n : n + hit + 1].tolist()
        n += hit + 1
        steps += 1
    return (n - start) / steps


def test_a_drafter_spools_what_it_verifies_and_the_next_one_drafts_from_it_at_once(own_datastore, tmp_path):
    """A restart with the same online_store_path drafts from the previous run's answers from its first step."""
    datastore = Datastore.load(own_datastore)
    config = DresdConfig.from_dict({"datastore": own_datastore, "context": False, "online_store_path": str(tmp_path)})
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 400, 200)
    states = torch.randn(len(tokens), datastore.manifest.hidden_size)

    first = Drafter(datastore, config)
    before = serve(first, "a", tokens, states, start=20)
    spooled = first.stats.spooled_keys
    first.close()
    assert spooled > 150 and len(read_spool(tmp_path, projection_id(datastore.projection)).keys) == spooled

    second = Drafter(datastore, config)
    assert second.stats.reloaded_keys == spooled and second.stats.online_keys == spooled
    after = serve(second, "b", tokens, states, start=20)
    second.close()
    fresh = Drafter(datastore, DresdConfig.from_dict({"datastore": own_datastore, "context": False}))
    cold = serve(fresh, "b", tokens, states, start=20)
    print(f"\ntokens per step: first run {before:.2f}, after restart {after:.2f}, without the spool {cold:.2f}")
    assert after > 3.0 and after > cold + 2.0


def test_dresd_build_folds_served_spools_into_a_datastore(tiny_model, own_datastore, tmp_path):
    """`dresd-build datastore --append --spool A B`: two replicas' served states become datastore keys whose
    values are what the requests produced, without running the model; a rerun folds only new chunks."""
    out = tmp_path / "ds"
    shutil.copytree(own_datastore, out)
    datastore = Datastore.load(out)
    base_keys, n_next = datastore.manifest.num_keys, datastore.n_next
    rng = np.random.default_rng(1)

    def replica(name: str) -> tuple[np.ndarray, torch.Tensor, int]:
        config = {"datastore": str(out), "context": False, "online_store_path": str(tmp_path / name)}
        drafter = Drafter(datastore, DresdConfig.from_dict(config))
        tokens, states = rng.integers(3, 400, 80), torch.randn(80, datastore.manifest.hidden_size)
        serve(drafter, name, tokens, states, start=10)
        drafter.close()
        return tokens, states, drafter.stats.spooled_keys  # the states of positions 10, 11, ...

    served = {name: replica(name) for name in ("a", "b")}

    def fold(*spools: str) -> dict:
        args = ["datastore", "--model", tiny_model, "--out", str(out), "--max-length", str(BUILD_MAX_LENGTH)]
        return run_datastore(parse_args([*args, "--append", "--spool", *(str(tmp_path / s) for s in spools)]))

    summary = fold("a", "b")
    folded = Datastore.load(out)
    assert summary["appended_keys"] == sum(n for *_, n in served.values()) == folded.manifest.num_keys - base_keys
    eos = folded.tokens[-1]  # the token store ends in EOS padding
    for tokens, states, count in served.values():
        # The state that produced token p is now a key whose value is tokens p, p+1, ... (EOS past the end).
        _, ids = folded.index.search(datastore.projection(states[10 : 10 + count]), 1)
        assert (ids[:, 0] >= base_keys).all()
        want = np.concatenate([tokens[10 : 10 + count], np.full(n_next + 1, eos)])
        expected = np.stack([want[i : i + n_next + 1] for i in range(count)])
        np.testing.assert_array_equal(folded.continuations(ids[:, 0]), expected)
    assert fold("a", "b") == {}  # every chunk folded before
    *_, count = replica("a-again")
    shutil.copytree(tmp_path / "a-again", tmp_path / "a", dirs_exist_ok=True)  # the replica's spool grew
    assert fold("a", "b")["appended_keys"] == count

    SpoolWriter(tmp_path / "other", "sha256:other", datastore.manifest.pca_dim, 1 << 30).close()
    with pytest.raises(InputError, match=r"--spool .*other: the spool in .* holds keys made with another projection"):
        fold("other")
    with pytest.raises(InputError, match="not a spool"):
        fold("nothing")
    no_append = ["datastore", "--model", tiny_model, "--out", str(out), "--spool", str(tmp_path / "a")]
    with pytest.raises(InputError, match="give --append"):
        run_datastore(parse_args(no_append))
    nowhere = [*no_append[:4], str(tmp_path / "none"), "--append", "--spool", str(tmp_path / "a")]
    with pytest.raises(InputError, match="holds no datastore to append to"):
        run_datastore(parse_args(nowhere))
