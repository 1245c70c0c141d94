"""The datastore format: token store layout, round trip, atomic writes (with a real SIGKILL), bad input."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dresd_vllm.index.build import build_index
from dresd_vllm.index.search import SearchOptions
from dresd_vllm.store.datastore import Datastore
from dresd_vllm.store.manifest import FORMAT_VERSION, DatastoreError, Manifest, tokenizer_fingerprint
from dresd_vllm.store.projection import Projection
from dresd_vllm.store.writer import token_store_from_sequences, write_datastore

H, D, VOCAB, N_NEXT, EOS = 32, 8, 50, 4, 1
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@dataclasses.dataclass
class Parts:
    manifest: Manifest
    projection: Projection
    keys: np.ndarray
    states: np.ndarray
    sequences: list[np.ndarray]
    tokens: np.ndarray
    offsets: np.ndarray

    def write(self, path: Path, **changes) -> Path:
        manifest = dataclasses.replace(self.manifest, **changes)
        return write_datastore(path, manifest, self.projection, self.keys, self.tokens, self.offsets)


@pytest.fixture(scope="module")
def parts() -> Parts:
    rng = np.random.default_rng(0)
    sequences = [rng.integers(2, VOCAB, size=n) for n in (30, 5, 47, 18)]
    tokens, offsets = token_store_from_sequences(sequences, N_NEXT, EOS)
    states = (rng.standard_normal((len(offsets), H)) * rng.uniform(0.5, 3, H)).astype(np.float32)
    projection = Projection.fit(states, dim=D)
    manifest = Manifest(
        model="tiny/model",
        hidden_size=H,
        vocab_size=VOCAB,
        tokenizer_fingerprint="sha256:abc",
        template="Question: {prompt}\nAnswer:\n",
        n_next=N_NEXT,
        pca_dim=D,
        num_keys=len(offsets),
        index_factory="Flat",
        build={"seed": 0, "note": "test"},
    )
    return Parts(manifest, projection, projection.transform(states), states, sequences, tokens, offsets)


@pytest.fixture
def store(parts, tmp_path) -> Path:
    return parts.write(tmp_path / "ds")


def test_token_store_layout():
    tokens, offsets = token_store_from_sequences([[5, 6, 7], np.array([8, 9])], n_next=2, eos_id=0)
    assert tokens.dtype == np.int32 and offsets.dtype == np.int64
    assert tokens.tolist() == [5, 6, 7, 0, 0, 0, 8, 9, 0, 0, 0]
    assert offsets.tolist() == [0, 1, 2, 6, 7]


def test_round_trip(parts, store):
    ds = Datastore.load(store)
    m = ds.manifest
    assert dataclasses.replace(m, build={}) == dataclasses.replace(parts.manifest, build={})
    assert m.format_version == FORMAT_VERSION and m.build["note"] == "test" and "write_s" in m.build
    assert sorted(p.name for p in store.parent.iterdir()) == ["ds"]  # no temporary sibling left
    x = torch.from_numpy(parts.states[:20])
    assert torch.equal(ds.projection(x), parts.projection(x))
    # In memory, not mapped: a store changed under a running server must not SIGBUS its worker.
    assert not isinstance(ds.tokens, np.memmap) and not isinstance(ds.offsets, np.memmap)
    np.testing.assert_array_equal(ds.tokens, parts.tokens)
    np.testing.assert_array_equal(ds.offsets, parts.offsets)
    _, ids = ds.index.search(ds.projection(x), 1)
    assert ids[:, 0].tolist() == list(range(20))  # each state finds its own key


def test_continuations_follow_the_paper(parts, store):
    """Key for position p: value[0] = token p + 1 (what its state produced), then N more, EOS-padded."""
    ds = Datastore.load(store)
    expected = []
    for seq in parts.sequences:
        padded = list(seq) + [EOS] * (N_NEXT + 1)
        expected += [padded[p + 1 : p + N_NEXT + 2] for p in range(len(seq))]
    ids = np.arange(len(expected)).reshape(-1, 4)[:, ::-1].copy()  # [B, K] in any order
    values = ds.continuations(ids)
    assert values.shape == (*ids.shape, N_NEXT + 1) and values.dtype == np.int32
    np.testing.assert_array_equal(values, np.asarray(expected)[ids])
    np.testing.assert_array_equal(ds.first_tokens(ids), values[..., 0])


def test_missing_ids_are_masked(store):
    ds = Datastore.load(store)
    ids = np.array([[3, -1], [-1, -1]])
    values = ds.continuations(ids)
    assert np.all(values[ids == -1] == -1) and np.all(values[0, 0] >= 0)
    assert ds.first_tokens(ids).tolist()[1] == [-1, -1]


def test_auto_index_and_nprobe_are_recorded(parts, tmp_path):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(2, VOCAB, size=1000) for _ in range(3)]
    tokens, offsets = token_store_from_sequences(seqs, N_NEXT, EOS)
    keys = rng.standard_normal((len(offsets), D)).astype(np.float16)
    manifest = dataclasses.replace(parts.manifest, num_keys=0, index_factory="auto")
    m = Datastore.load(write_datastore(tmp_path / "a", manifest, parts.projection, keys, tokens, offsets)).manifest
    assert (m.index_factory, m.nprobe, m.num_keys) == ("Flat", None, 3000)
    ivf = build_index(keys, "IVF16,Flat")
    manifest = dataclasses.replace(manifest, index_factory="IVF16,Flat", nprobe=5)
    path = write_datastore(tmp_path / "b", manifest, parts.projection, ivf, tokens, offsets)
    ds = Datastore.load(path)
    assert ds.manifest.nprobe == 5 and ds.index.nprobe == 5
    assert Datastore.load(path, SearchOptions(nprobe=2)).index.nprobe == 2


def test_replaces_a_datastore_but_nothing_else(parts, store, tmp_path):
    parts.write(store, template="other")
    assert Datastore.load(store).manifest.template == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(DatastoreError, match="notes: exists, is not empty and has no manifest.json"):
        parts.write(tmp_path / "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatastoreError, match="file: exists and is not a directory"):
        parts.write(tmp_path / "file")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_write_validates_its_parts(parts, tmp_path):
    with pytest.raises(DatastoreError, match=r"tokens: ids must lie in \[0, vocab_size=10\)"):
        parts.write(tmp_path / "x", vocab_size=10)
    with pytest.raises(DatastoreError, match="offsets: every offset \\+ n_next \\+ 1 must index tokens"):
        parts.write(tmp_path / "x", n_next=N_NEXT + 1)
    with pytest.raises(DatastoreError, match="projection dim is 8 but pca_dim is 16"):
        parts.write(tmp_path / "x", pca_dim=16)
    with pytest.raises(DatastoreError, match="projection hidden size is 32 but hidden_size is 64"):
        parts.write(tmp_path / "x", hidden_size=64)
    auto = dataclasses.replace(parts.manifest, index_factory="auto")
    index = build_index(parts.keys, "Flat")
    with pytest.raises(DatastoreError, match="index_factory: 'auto' describes keys to index, not a built index"):
        write_datastore(tmp_path / "x", auto, parts.projection, index, parts.tokens, parts.offsets)
    with pytest.raises(ValueError, match="n_next\n  Input should be a valid integer"):  # 4.0 would not read back
        dataclasses.replace(parts.manifest, n_next=float(N_NEXT))
    assert not any(tmp_path.iterdir())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(store: Path, **changes) -> None:
    data = json.loads((store / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    (store / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "manifest.json").unlink(), r"no datastore here \(missing manifest.json\)"),
        (lambda s: _truncate(s / "manifest.json"), "manifest.json: not valid JSON, the file is damaged or truncated"),
        (lambda s: _edit_manifest(s, format_version=2), "manifest.json: format_version is 2, expected 1"),
        (lambda s: _edit_manifest(s, n_next=None), "manifest.json: missing field 'n_next'"),
        (lambda s: _edit_manifest(s, hidden_size="32"), "manifest.json: field 'hidden_size' is '32', expected int"),
        (lambda s: _edit_manifest(s, n_next=True), "manifest.json: field 'n_next' is True, expected int"),
        (lambda s: _edit_manifest(s, nprobe=2.0), r"manifest.json: field 'nprobe' is 2.0, expected int \| None"),
        (lambda s: _edit_manifest(s, build=[]), r"manifest.json: field 'build' is \[\], expected dict\[str, Any\]"),
        (lambda s: _edit_manifest(s, colour="red"), r"manifest.json: unknown fields \['colour'\]"),
        (lambda s: (s / "index.faiss").unlink(), "index.faiss: missing from the datastore"),
        (lambda s: (s / "tokens.npy").unlink(), "tokens.npy: missing from the datastore"),
        (lambda s: _truncate(s / "index.faiss"), "index.faiss: not a readable FAISS index"),
        (lambda s: _truncate(s / "projection.safetensors"), "projection.safetensors: not a readable projection"),
        (lambda s: _truncate(s / "tokens.npy"), "tokens.npy: not a readable .npy array"),
        (lambda s: _truncate(s / "offsets.npy"), "offsets.npy: not a readable .npy array"),
        (lambda s: np.save(s / "tokens.npy", np.zeros(8, np.int64)), r"tokens.npy: expected a flat int32 array"),
        (lambda s: np.save(s / "tokens.npy", np.zeros(8, np.int32)), r"offsets.npy: offsets must lie in \[0, 3\)"),
        (lambda s: _edit_manifest(s, num_keys=7), "offsets.npy: 100 offsets, manifest.json says num_keys=7"),
        (
            lambda s: _edit_manifest(s, hidden_size=64),
            "projection.safetensors: hidden_size is 32, manifest.json says 64",
        ),
    ],
)
def test_load_refuses_damage_and_names_the_file(store, damage, message):
    damage(store)
    with pytest.raises(DatastoreError, match=message):
        Datastore.load(store)


def test_check_model(store):
    ds = Datastore.load(store)
    ds.check_model(hidden_size=H, vocab_size=VOCAB, tokenizer_fingerprint="sha256:abc")
    ds.check_model(hidden_size=H, vocab_size=VOCAB, tokenizer_fingerprint=None)
    for kwargs, message in [
        (dict(hidden_size=64), r"hidden_size is 32 in manifest.json \(built from 'tiny/model'\) but the model has 64"),
        (dict(vocab_size=51), "vocab_size is 50 in manifest.json .* but the model has 51"),
        (dict(tokenizer_fingerprint="sha256:def"), "tokenizer_fingerprint is 'sha256:abc' .* has 'sha256:def'"),
    ]:
        with pytest.raises(DatastoreError, match=message):
            ds.check_model(**{"hidden_size": H, "vocab_size": VOCAB, "tokenizer_fingerprint": "sha256:abc", **kwargs})


def test_tokenizer_fingerprint():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def make(vocab, template=None, **special):
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), **special)
        tok.chat_template = template
        return tok

    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3}
    base = tokenizer_fingerprint(make(vocab, eos_token="</s>"))
    assert base.startswith("sha256:") and base == tokenizer_fingerprint(
        make(dict(reversed(vocab.items())), eos_token="</s>")
    )
    assert base != tokenizer_fingerprint(make({**vocab, "a": 3, "b": 2}, eos_token="</s>"))
    assert base != tokenizer_fingerprint(make(vocab, eos_token="a"))
    assert base != tokenizer_fingerprint(make(vocab, template="{{ messages }}", eos_token="</s>"))


# A child that writes a datastore; `rename_blocks` stops it just before the final rename.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import faiss
    from dresd_vllm.store.writer import write_datastore
    from dresd_vllm.store.manifest import Manifest
    from dresd_vllm.store.projection import Projection

    path, num_tokens, rename_blocks = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    if rename_blocks:
        def rename(src, dst):
            print("RENAMING", flush=True)
            time.sleep(600)
        os.rename = rename
    states = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    projection = Projection(np.zeros(16), np.ones(16), np.eye(4, 16), np.zeros(16))  # no sklearn import: faster
    tokens = np.zeros(num_tokens, dtype=np.int32)
    offsets = np.arange(200, dtype=np.int64)
    manifest = Manifest(
        model="m", hidden_size=16, vocab_size=10, tokenizer_fingerprint=None, template="t",
        n_next=4, pca_dim=4, num_keys=200, index_factory="Flat",
    )
    print("WRITING", flush=True)
    write_datastore(path, manifest, projection, projection.transform(states), tokens, offsets)
    print("DONE", flush=True)
    """
)


@contextlib.contextmanager
def _sigkilled_child(path: Path, num_tokens: int, rename_blocks: bool) -> Iterator[subprocess.Popen]:
    """The CHILD writer, SIGKILLed when the block ends (and killed anyway if the block fails)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(num_tokens), "1" if rename_blocks else "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        yield child
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL


def _assert_no_datastore(path: Path) -> None:
    assert not path.exists()
    with pytest.raises(DatastoreError, match="no datastore here"):
        Datastore.load(path)


def test_sigkill_before_the_rename_leaves_no_datastore(tmp_path):
    path = tmp_path / "ds"
    with _sigkilled_child(path, 10_000, rename_blocks=True) as child:
        lines = [child.stdout.readline().strip() for _ in range(2)]
        assert lines == ["WRITING", "RENAMING"]
    _assert_no_datastore(path)
    leftovers = list(tmp_path.glob(".ds.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").is_file()  # everything written but the rename


def test_sigkill_while_writing_a_large_store_leaves_no_datastore(tmp_path):
    path = tmp_path / "ds"
    with _sigkilled_child(path, 16_000_000, rename_blocks=False) as child:  # 64 MB of tokens
        assert child.stdout.readline().strip() == "WRITING"
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".ds.tmp-*/tokens.npy")):  # kill while the big file is being written
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.001)
    _assert_no_datastore(path)
    assert not list(tmp_path.glob(".ds.tmp-*/manifest.json"))
