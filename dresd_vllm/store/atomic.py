"""Atomic writes: a reader sees either no file (or directory) or a complete one, never a torn one.

Everything is written into a hidden temporary sibling ``.NAME.tmp-PID-RANDOM``, fsynced, and renamed
into place; the parent directory is fsynced so the rename survives a crash. The writer's process id in
the name lets a later write of the same path remove what a killed writer left behind without touching
another write still in progress.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s entries (creations, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of ``path`` named for this process: ``.NAME.KIND-PID-RANDOM``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temps(path: Path) -> None:
    """Remove what killed writes of ``path`` left behind: hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings.

    Their names carry the writer's process id; one whose process still runs is another write in
    progress and is left alone.
    """
    if not path.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for stale in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = stale.name.removeprefix(f".{path.name}.{kind}-").split("-")[0]
            if pid.isdigit() and _process_alive(int(pid)):
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path: str | os.PathLike, save: Callable[[Path], object]) -> Path:
    """Write the file ``path`` through ``save(temp_path)``, fsync it and rename it into place.

    ``save`` must write exactly the path it is given (``np.save`` to a path would append ``.npy``:
    give it an open file instead). On any error the temporary file is removed and the error raised.
    """
    path = Path(path)
    remove_stale_temps(path)
    tmp = sibling(path)
    try:
        save(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the complete directory ``tmp`` to ``path``, replacing what is there, and fsync the parent."""
    old = None
    if path.exists():
        # rename() cannot replace a non-empty directory, so the old one steps aside first.
        old = sibling(path, "old")
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
