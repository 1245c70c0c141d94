"""dresd_vllm.store.atomic: the one atomic write behind every file the project writes."""

import os

import numpy as np
import pytest

from dresd_vllm.rest.suffix_array import SuffixArrayStore, write_rest_datastore
from dresd_vllm.store.atomic import write_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = write_atomic(tmp_path / "plan.json", lambda tmp: tmp.write_text("old"))

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_next_write_removes_stale_temp_files_of_killed_writes(tmp_path):
    dead = tmp_path / f".x.npz.tmp-{2**22 + 1}-0a1b2c3d"  # a process id above Linux's pid_max: not running
    alive = tmp_path / f".x.npz.tmp-{os.getpid()}-0a1b2c3d"  # a write still in progress
    for p in (dead, alive):
        p.write_bytes(b"partial")
    write_rest_datastore(tmp_path / "x.npz", [[1, 2, 3]], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.npz", alive.name])
    assert np.array_equal(SuffixArrayStore(tmp_path / "x.npz").tokens, [1, 2, 3, -1])
