"""benchmarks.full_spool: a spool of a datastore's own keys that a drafter reloads as a full online store."""

import numpy as np
import pytest
import torch

from benchmarks import full_spool
from benchmarks.synthetic import SyntheticSettings, open_or_build
from dresd_vllm.index.search import SearchOptions
from dresd_vllm.online.spool import chunk_files, projection_id, read_spool
from dresd_vllm.online.spool_writer import SpoolWriter
from dresd_vllm.store.datastore import Datastore

NUM_KEYS, DIM = 3000, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Datastore, np.ndarray]:
    """A real synthetic datastore (IVF, FAISS) of 3,000 keys in sequences of 512, and its keys."""
    settings = SyntheticSettings(num_keys=NUM_KEYS, hidden_size=64, pca_dim=DIM, factory="IVF8,Flat")
    built = open_or_build(tmp_path_factory.mktemp("full-spool"), settings)
    return Datastore.load(built.path, SearchOptions(backend="faiss")), np.asarray(built.keys)


def test_spool_of_a_wrapped_window_reloads_into_a_store_of_its_keys(store, tmp_path):
    ds, keys = store
    ids = full_spool.window(NUM_KEYS, 4000, start=2500)  # past the end: wraps around to key 0
    assert full_spool.write_spool(ds, ids, tmp_path, chunk_rows=1024) == 4
    assert all(p.name.startswith(full_spool.PINNED) for p in chunk_files(tmp_path))

    spooled = read_spool(tmp_path, projection_id(ds.projection))
    assert spooled.keys.shape == (4000, DIM) and spooled.keys.dtype == np.float16
    np.testing.assert_array_equal(spooled.keys, keys[ids])  # IVF-Flat gives the stored keys back exactly
    np.testing.assert_array_equal(spooled.tokens, ds.first_tokens(ids))
    assert spooled.tokens.min() >= 0 and spooled.tokens.max() < ds.manifest.vocab_size
    # Each key's value is the datastore's, joined from the following keys of its run; unknown (-1) only
    # past a run's end, where the datastore holds its EOS padding.
    values, stored = spooled.values(ds.n_next), ds.continuations(ids)
    known = values >= 0
    assert known[:, 0].all() and (values[known] == stored[known]).all()
    runs = len(np.unique(spooled.groups))
    assert runs == 2 + 6 + 1  # the end of sequence 4, sequence 5, all six, the start of 0 again
    assert (~known).sum() <= runs * ds.n_next * (ds.n_next + 1) // 2

    reloaded, held = full_spool.reload(ds, tmp_path, online_store_size=3500)
    assert reloaded == 3500  # the newest keys, up to the store's size
    assert 0.9 * 3500 <= held <= 3500  # an IVF list that overflows its ring drops its oldest keys


def test_every_start_reloads_the_same_keys_whatever_the_runs_appended(store, tmp_path, capsys):
    ds, keys = store
    out = tmp_path / "spool"
    argv = ["--datastore", str(ds.path), "--keys", "2000", "--out", str(out), "--online-store-size", "2000"]
    assert full_spool.main(argv) == 0
    assert f"{out}: 2000 keys of {DIM} dims" in capsys.readouterr().out
    identity = projection_id(ds.projection)
    pinned = read_spool(out, identity)

    # A run serves and spools its own states into the directory: newer in time, older by name.
    writer = SpoolWriter(out, identity, DIM, max_bytes=1 << 30)
    writer.append(torch.zeros((50, DIM), dtype=torch.float16), np.ones(50, np.int32), np.arange(50), np.zeros(50))
    writer.close()
    assert len(read_spool(out, identity).keys) == 2050
    newest = read_spool(out, identity, max_rows=2000)  # what a store of 2,000 reloads
    assert newest.chunks == pinned.chunks
    np.testing.assert_array_equal(newest.keys, pinned.keys)
    assert full_spool.reload(ds, out, online_store_size=2000)[0] == 2000

    assert full_spool.main(argv) == 2  # never over an existing directory
    assert "exists" in capsys.readouterr().err and len(read_spool(out, identity).keys) == 2050
