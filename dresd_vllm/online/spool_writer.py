"""The spool's writer: a drafter's verified states appended in checksummed chunks by a background thread.

The format, and reading it back, are :mod:`dresd_vllm.online.spool`'s.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing.util
import os
import queue
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from dresd_vllm.online.spool import (
    FORMAT,
    INFO,
    LENGTH,
    MAGIC,
    SUFFIX,
    check_info,
    chunk_files,
    logger,
    projection_id,
    read_spool,
)
from dresd_vllm.online.store import OnlineStore
from dresd_vllm.store.atomic import remove_stale_temps, write_atomic
from dresd_vllm.store.datastore import Datastore

# Rows of a chunk: 8192 keys of 64 dimensions make a file of about 1.2 MB.
CHUNK_ROWS = 8192
# A chunk that has waited this long is written even if not full: what a server stopped or killed loses.
# (vLLM kills its worker processes at shutdown, so the last partial chunk cannot wait for an exit hook.)
FLUSH_S = 5.0
# Most chunk files kept, whatever their size (light traffic writes small ones).
MAX_CHUNKS = 10_000
# Chunks waiting for the writer (about 10 MB); past this a step drops its chunk rather than wait for the disk.
QUEUE_CHUNKS = 8


def open_spool(
    directory: Path, datastore: Datastore, online: OnlineStore | None, max_bytes: int
) -> tuple[SpoolWriter, int]:
    """Reload the spool into ``online`` (its newest keys, up to the store's capacity), then a writer that
    appends to it. Returns the writer and the number of keys reloaded."""
    identity = projection_id(datastore.projection)
    reloaded = 0
    if online is not None:
        spooled = read_spool(directory, identity, max_rows=online.capacity)
        newest = slice(max(len(spooled.keys) - online.capacity, 0), None)
        keys, values = spooled.keys[newest], spooled.values(datastore.n_next)[newest]
        online.add_complete(torch.from_numpy(keys), values)
        reloaded = len(keys)
    return SpoolWriter(
        directory, identity, datastore.manifest.pca_dim, max_bytes, device=datastore.index.device
    ), reloaded


class SpoolWriter:
    """Appends a drafter's verified states to the spool in ``directory`` (see the module docstring).

    :meth:`append` only copies into a preallocated chunk (on the keys' device: a GPU's keys are
    copied back once a chunk, not once a step); files are written by a background thread, which
    also hands over a chunk that has waited ``flush_s``. A chunk that finds ``queued`` chunks
    waiting for the disk is dropped and counted, never waited for. :meth:`close` writes the last
    partial chunk; it also runs when the process exits normally (``atexit``, and a multiprocessing
    finaliser for processes that exit through multiprocessing, which skips ``atexit``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        projection: str,
        dim: int,
        max_bytes: int,
        device: torch.device | str = "cpu",
        chunk_rows: int = CHUNK_ROWS,
        flush_s: float = FLUSH_S,
        queued: int = QUEUE_CHUNKS,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.projection = projection
        if check_info(self.directory, projection) is None:
            info = dict(format=FORMAT, projection=projection, dim=dim, created=time.time())
            write_atomic(self.directory / INFO, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
        for stale in self.directory.glob(f".*{SUFFIX}.tmp-*"):  # what killed writers left behind
            remove_stale_temps(self.directory / stale.name[1:].split(".tmp-")[0])
        self.dim, self.max_bytes, self.flush_s = dim, max_bytes, flush_s
        self.run = uuid.uuid4().hex[:16]
        self._keys = torch.empty((chunk_rows, dim), dtype=torch.float16, device=device)
        self._tokens = np.empty(chunk_rows, dtype=np.int32)
        self._positions = np.empty(chunk_rows, dtype=np.int32)
        self._tags = np.empty(chunk_rows, dtype=np.int64)
        self._fill = 0
        self._since = 0.0  # when the chunk being filled got its first row
        self._seq = 0
        self.written_rows = 0  # rows in chunks the writer has written
        self.dropped_rows = 0
        self.errors = 0
        self._lock = threading.Lock()  # the step and the writer's timed flush share the chunk being filled
        self._queue: queue.Queue = queue.Queue(maxsize=queued)
        self._thread = threading.Thread(target=self._write_loop, name="dresd-spool", daemon=True)
        self._thread.start()
        self._closed = False
        atexit.register(self.close)
        self._finalizer = multiprocessing.util.Finalize(self, self.close, exitpriority=100)

    def append(self, keys: torch.Tensor, tokens: np.ndarray, positions: np.ndarray, tags: np.ndarray) -> None:
        """Spool ``keys [R, dim]``: row r's state produced ``tokens[r]`` at ``positions[r]`` of request ``tags[r]``."""
        count, done = len(tokens), 0
        with self._lock:
            while done < count:
                if not self._fill:
                    self._since = time.monotonic()
                take = min(count - done, len(self._tokens) - self._fill)
                rows = slice(self._fill, self._fill + take)
                self._keys[rows] = keys[done : done + take]
                self._tokens[rows] = tokens[done : done + take]
                self._positions[rows] = positions[done : done + take]
                self._tags[rows] = tags[done : done + take]
                self._fill += take
                done += take
                if self._fill == len(self._tokens):
                    self._flush()

    def flush(self) -> None:
        """Hand the rows gathered so far to the writer as one chunk."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._fill:
            return
        fill, self._fill = self._fill, 0
        chunk = (
            self._keys[:fill].cpu().numpy().copy(),
            self._tokens[:fill].copy(),
            self._positions[:fill].copy(),
            self._tags[:fill].copy(),
        )
        try:
            self._queue.put_nowait(chunk)
        except queue.Full:
            if not self.dropped_rows:
                logger.warning("DReSD spool: the disk is behind; chunks are dropped while it catches up")
            self.dropped_rows += fill

    def close(self) -> None:
        """Write the partial chunk and wait for the writer to finish (at most a minute)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._finalizer.cancel()
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _write_loop(self) -> None:
        while True:
            try:
                chunk = self._queue.get(timeout=max(self.flush_s / 4, 0.05))
            except queue.Empty:
                with self._lock:
                    if self._fill and time.monotonic() - self._since >= self.flush_s:
                        self._flush()
                continue
            if chunk is None:
                return
            try:
                self._write(*chunk)
            except Exception:
                self.errors += 1
                if self.errors == 1:
                    logger.exception("DReSD spool: writing a chunk to %s failed; serving goes on", self.directory)

    def _write(self, keys: np.ndarray, tokens: np.ndarray, positions: np.ndarray, tags: np.ndarray) -> None:
        payload = b"".join(a.tobytes() for a in (keys, tokens, positions, tags))
        header = json.dumps(
            dict(
                format=FORMAT,
                run=self.run,
                seq=self._seq,
                projection=self.projection,
                rows=len(tokens),
                dim=self.dim,
                sha256="sha256:" + hashlib.sha256(payload).hexdigest(),
                created=time.time(),
            )
        ).encode()
        name = f"{time.time_ns():020d}-{self.run}-{self._seq:08d}{SUFFIX}"
        self._seq += 1

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(MAGIC + LENGTH.pack(len(header)) + header + payload)

        write_atomic(self.directory / name, save)
        self.written_rows += len(tokens)
        self._bound()

    def _bound(self) -> None:
        """Delete the oldest chunks until the spool holds at most max_bytes and MAX_CHUNKS (never the newest)."""
        files = chunk_files(self.directory)
        sizes = []
        for path in files:
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:  # another replica's writer deleted it
                sizes.append(0)
        total, count = sum(sizes), len(files)
        for path, size in zip(files[:-1], sizes[:-1], strict=True):
            if total <= self.max_bytes and count <= MAX_CHUNKS:
                break
            path.unlink(missing_ok=True)
            total -= size
            count -= 1
