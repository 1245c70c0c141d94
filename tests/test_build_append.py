"""`dresd-build datastore --append`: a corpus added to a datastore retrieves like a build of both."""

import shutil

import numpy as np
import pytest
import torch
from conftest import build_args, in_process_vllm

from build_tools.build import run_datastore, work_dir
from build_tools.cli import parse_args
from build_tools.data import InputError
from dresd_vllm.store.datastore import Datastore


@pytest.fixture(scope="module")
def halves(build_corpus, tmp_path_factory):
    """The shared build corpus cut in two JSONL files: A (its first 12 rows) and B (the rest)."""
    lines = build_corpus.read_text().splitlines(keepends=True)
    tmp = tmp_path_factory.mktemp("halves")
    (tmp / "a.jsonl").write_text("".join(lines[:12]))
    (tmp / "b.jsonl").write_text("".join(lines[12:]))
    return tmp / "a.jsonl", tmp / "b.jsonl"


def test_append_equals_a_build_of_both(tiny_model, halves, single_build, tmp_path):
    out = tmp_path / "ds"
    with in_process_vllm():
        run_datastore(parse_args(build_args(tiny_model, halves[0], out, "--index", "Flat")))
        only_a = Datastore.load(out)
        a_keys = only_a.index.index.reconstruct_n(0, only_a.index.ntotal)
        summary = run_datastore(parse_args(build_args(tiny_model, halves[1], out, "--index", "Flat", "--append")))
        assert summary["appended_keys"] == summary["keys"] - len(a_keys)
        assert not work_dir(out).exists()
        # The same append again finds its corpus recorded and does nothing.
        assert run_datastore(parse_args(build_args(tiny_model, halves[1], out, "--index", "Flat", "--append"))) == {}

    both, whole = Datastore.load(out), Datastore.load(single_build[0])  # whole: one build over A + B
    assert both.manifest.num_keys == whole.manifest.num_keys
    assert [a["keys"] for a in both.manifest.build["appended"]] == [both.manifest.num_keys - len(a_keys)]
    # Values: the same token store as the build of A + B.
    np.testing.assert_array_equal(both.tokens, whole.tokens)
    np.testing.assert_array_equal(both.offsets, whole.offsets)
    # Keys: A's kept as they were; B's projected with A's projection, each found as its own nearest key
    # (or as an identical one: sequences share their template's first positions).
    keys = both.index.index.reconstruct_n(0, both.index.ntotal)
    np.testing.assert_array_equal(keys[: len(a_keys)], a_keys)
    assert torch.equal(both.projection.weight, only_a.projection.weight)
    b_ids = np.arange(len(a_keys), len(keys), 97)
    _, ids = both.index.search(torch.from_numpy(keys[b_ids]), 1)
    np.testing.assert_array_equal(keys[ids[:, 0]], keys[b_ids])


def test_append_refuses_what_does_not_fit(tiny_model, halves, single_build, tmp_path):
    with pytest.raises(InputError, match="holds no datastore to append to"):
        run_datastore(parse_args(build_args(tiny_model, halves[1], tmp_path / "none", "--append")))
    out = tmp_path / "ds"
    shutil.copytree(single_build[0], out)
    with pytest.raises(InputError, match="was built with n_next=20, this corpus asks for 8"):
        run_datastore(parse_args(build_args(tiny_model, halves[1], out, "--append", "--n-next", "8")))
