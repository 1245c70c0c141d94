"""Appending to a datastore retrieves like building it from both corpora at once."""

import numpy as np
import pytest
import torch

from dresd_vllm.index.build import build_index, new_index, set_search_defaults, train_index, train_rows
from dresd_vllm.index.search import SearchOptions
from dresd_vllm.store.datastore import Datastore
from dresd_vllm.store.manifest import DatastoreError, Manifest
from dresd_vllm.store.projection import Projection
from dresd_vllm.store.writer import append_datastore, token_store_from_sequences, write_datastore

H, D, VOCAB, N_NEXT, EOS = 48, 16, 500, 4, 1


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def corpus(rng: np.random.Generator, lengths: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Token sequences and one hidden state per position."""
    seqs = [rng.integers(2, VOCAB, size=n) for n in lengths]
    return seqs, rng.standard_normal((sum(lengths), H)).astype(np.float32)


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(0)
    seqs_a, states_a = corpus(rng, [300, 41, 700, 500])
    seqs_b, states_b = corpus(rng, [250, 9, 400])
    projection = Projection.fit(states_a, dim=D)
    return projection, (seqs_a, projection.transform(states_a)), (seqs_b, projection.transform(states_b))


def manifest(num_keys: int, factory: str) -> Manifest:
    return Manifest(
        model="m",
        hidden_size=H,
        vocab_size=VOCAB,
        tokenizer_fingerprint=None,
        template="{prompt}",
        n_next=N_NEXT,
        pca_dim=D,
        num_keys=num_keys,
        index_factory=factory,
    )


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQfp16", "IVF16,PQ4"])
def test_append_retrieves_like_a_build_of_both(parts, factory, tmp_path):
    projection, (seqs_a, keys_a), (seqs_b, keys_b) = parts
    tokens_a, offsets_a = token_store_from_sequences(seqs_a, N_NEXT, EOS)
    tokens_b, offsets_b = token_store_from_sequences(seqs_b, N_NEXT, EOS)
    appended = write_datastore(tmp_path / "a", manifest(len(keys_a), factory), projection, keys_a, tokens_a, offsets_a)
    append_datastore(appended, keys_b, tokens_b, offsets_b, build={"corpus": "b"})

    # build(A + B), with the index trained where the appended one was trained: on A.
    trained = new_index(D, factory)
    rows = train_rows(len(keys_a), trained)
    if len(rows):
        train_index(trained, keys_a[rows])
    trained.add(np.concatenate([keys_a, keys_b]).astype(np.float32))
    set_search_defaults(trained)
    tokens, offsets = token_store_from_sequences(seqs_a + seqs_b, N_NEXT, EOS)
    both = write_datastore(tmp_path / "ab", manifest(len(offsets), factory), projection, trained, tokens, offsets)

    nprobe = None if factory == "Flat" else 4  # of 16 lists: approximate, so the lists' contents matter
    options = SearchOptions(nprobe=nprobe)
    got, want = Datastore.load(appended, options), Datastore.load(both, options)
    assert got.manifest.num_keys == want.manifest.num_keys == len(keys_a) + len(keys_b)
    assert got.manifest.build["appended"][0]["corpus"] == "b" and got.manifest.build["appended"][0]["keys"] == 659
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    queries = torch.from_numpy(np.concatenate([keys_b[:20], keys_a[:20]]))
    got_scores, got_ids = got.index.search(queries, 10)
    want_scores, want_ids = want.index.search(queries, 10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_scores, want_scores)
    np.testing.assert_array_equal(got.continuations(got_ids), want.continuations(want_ids))


def test_appended_keys_are_found_with_their_continuations(parts, tmp_path):
    projection, (seqs_a, keys_a), (seqs_b, keys_b) = parts
    tokens_a, offsets_a = token_store_from_sequences(seqs_a, N_NEXT, EOS)
    path = write_datastore(tmp_path / "a", manifest(len(keys_a), "Flat"), projection, keys_a, tokens_a, offsets_a)
    append_datastore(path, keys_b, *token_store_from_sequences(seqs_b, N_NEXT, EOS))
    ds = Datastore.load(path)
    _, ids = ds.index.search(torch.from_numpy(keys_b[[0, 251]]), 1)  # B's first key, and its second sequence's
    assert ids[:, 0].tolist() == [len(keys_a), len(keys_a) + 251]
    assert ds.continuations(ids[:, 0]).tolist() == [seqs_b[0][1:6].tolist(), seqs_b[1][2:7].tolist()]


def test_append_refuses_a_mismatch(parts, tmp_path):
    projection, (seqs_a, keys_a), (seqs_b, keys_b) = parts
    tokens_a, offsets_a = token_store_from_sequences(seqs_a, N_NEXT, EOS)
    path = write_datastore(tmp_path / "a", manifest(len(keys_a), "Flat"), projection, keys_a, tokens_a, offsets_a)
    tokens_b, offsets_b = token_store_from_sequences(seqs_b, N_NEXT, EOS)
    with pytest.raises(DatastoreError, match=r"keys: expected \[n, pca_dim=16\], got shape \(659, 8\)"):
        append_datastore(path, keys_b[:, :8], tokens_b, offsets_b)
    with pytest.raises(DatastoreError, match="no datastore to append to"):
        append_datastore(tmp_path / "none", keys_b, tokens_b, offsets_b)
    with pytest.raises(DatastoreError, match="index size is 1541 but the datastore has 1541 keys and 659 are added"):
        append_datastore(path, build_index(keys_a[:2000], "Flat"), tokens_b, offsets_b)
    assert Datastore.load(path).manifest.num_keys == len(keys_a)  # a refused append leaves the store as it was
