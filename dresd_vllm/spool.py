"""The online store's spool: the states a server verified and the tokens they produced, kept on disk.

With ``online_store_path`` set, every verified state the proposer projects (its fp16 key) goes into
an in-memory chunk with the token it produced, its position and its request's tag. A full chunk, or
one that has waited :data:`FLUSH_S`, goes to a background thread, which writes it as one file::

    MAGIC  u32 header length  header (JSON)  payload

The header names the writer's run, the projection the keys were made with (:func:`projection_id`),
the row count and the payload's sha256; the payload is keys fp16 ``[R, dim]``, tokens int32 ``[R]``,
positions int32 ``[R]`` and tags int64 ``[R]``. A chunk is written under a hidden temporary name,
fsynced and renamed into place, so a reader only ever sees whole chunks; one that does not check out
(a disk fault, a copy cut short) is skipped with a warning. After each chunk the oldest are deleted
until the directory holds at most ``max_bytes``. ``spool.json`` records the projection once, and a
drafter of another projection refuses the directory.

A key's value (the tokens that followed it) is not stored: it is the tokens of the same request's
next positions, joined when the spool is read back (:func:`read_spool`), into the online store at
start-up or into a datastore's token store by ``dresd-build datastore --append --spool``.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import multiprocessing.util
import os
import queue
import struct
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from dresd_vllm.atomic import remove_stale_temps, write_atomic
from dresd_vllm.projection import Projection

# Under vLLM's logger tree, so the lines appear in the server's log.
logger = logging.getLogger(f"vllm.{__name__}")

MAGIC = b"DRESDSPL"
FORMAT = 1
INFO = "spool.json"
SUFFIX = ".chunk"
# Rows of a chunk: 8192 keys of 64 dimensions make a file of about 1.2 MB.
CHUNK_ROWS = 8192
# A chunk that has waited this long is written even if not full: what a server stopped or killed loses.
# (vLLM kills its worker processes at shutdown, so the last partial chunk cannot wait for an exit hook.)
FLUSH_S = 5.0
# Most chunk files kept, whatever their size (light traffic writes small ones).
MAX_CHUNKS = 10_000
# Chunks waiting for the writer (about 10 MB); past this a step drops its chunk rather than wait for the disk.
QUEUE_CHUNKS = 8
_LENGTH = struct.Struct("<I")


class SpoolError(Exception):
    """A spool that cannot be used here: another projection's, or not a spool."""


def projection_id(projection: Projection) -> str:
    """sha256 of the projection's parameters: spooled keys mean something only under the same projection."""
    digest = hashlib.sha256()
    for array in (projection.mean, projection.std, projection.components, projection.pca_mean):
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return "sha256:" + digest.hexdigest()


def _check_info(directory: Path, projection: str) -> dict | None:
    """The directory's ``spool.json`` after checking its projection (None if there is none)."""
    try:
        info = json.loads((directory / INFO).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SpoolError(f"{directory / INFO}: unreadable ({e}); is {directory} a DReSD spool?") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise SpoolError(f"{directory / INFO}: not a DReSD spool of format {FORMAT}")
    if info.get("projection") != projection:
        raise SpoolError(
            f"the spool in {directory} holds keys made with another projection ({info.get('projection')}) than "
            f"this datastore's ({projection}): its states would be searched in the wrong space. Point "
            "online_store_path at another directory, or delete this one to start over"
        )
    return info


@dataclasses.dataclass
class Spooled:
    """Rows read back from spool chunks, oldest first."""

    keys: np.ndarray  # float16 [R, dim]
    tokens: np.ndarray  # int32 [R]: the token each key's state produced
    positions: np.ndarray  # int64 [R]: that token's position in its request
    groups: np.ndarray  # int64 [R]: the request (its run and tag), numbered
    chunks: list[str]  # the chunk files the rows came from

    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows sorted by request and position, and where each row starts a run of consecutive positions."""
        order = np.lexsort((self.positions, self.groups))
        groups, positions = self.groups[order], self.positions[order]
        starts = np.ones(len(order), dtype=bool)
        starts[1:] = (groups[1:] != groups[:-1]) | (positions[1:] != positions[:-1] + 1)
        return order, starts

    def values(self, n_next: int) -> np.ndarray:
        """Each key's value ``int32 [R, n_next + 1]``: its token and the ``n_next`` its request produced
        next; -1 past what the spool holds (the request ended, or its later rows were not spooled)."""
        order, starts = self._order()
        count = len(order)
        run_id = np.cumsum(starts) - 1
        run_end = np.append(np.flatnonzero(starts)[1:], count)[run_id]  # first row past the row's run
        ahead = np.arange(count)[:, None] + np.arange(n_next + 1)
        values = np.where(ahead < run_end[:, None], self.tokens[order][np.minimum(ahead, count - 1)], -1)
        out = np.empty_like(values, dtype=np.int32)
        out[order] = values
        return out

    def token_store(self, n_next: int, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows as a datastore part: ``(keys [R, dim], tokens int32, offsets int64)``.

        Each run of consecutive positions of one request is laid out as a build lays out a sequence
        (a filler token, the run's tokens, ``n_next + 1`` EOS), so key j's value is the tokens from
        its own on, EOS where the run ends, and the part costs a token a key rather than a value.
        """
        order, starts = self._order()
        run_id = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        lengths = np.diff(np.append(first, len(order)))
        run_start = np.concatenate(([0], np.cumsum(lengths + n_next + 2)[:-1]))
        within = np.arange(len(order)) - first[run_id]
        offsets = run_start[run_id] + within
        tokens = np.full(int(lengths.sum() + len(lengths) * (n_next + 2)), eos_id, dtype=np.int32)
        tokens[offsets + 1] = self.tokens[order]
        return self.keys[order], tokens, offsets.astype(np.int64)


def chunk_files(directory: Path) -> list[Path]:
    """The spool's chunk files, oldest first (their names start with the time they were made)."""
    return sorted(directory.glob(f"*{SUFFIX}"))


def read_spool(
    directory: str | os.PathLike, projection: str, max_rows: int | None = None, skip: frozenset[str] = frozenset()
) -> Spooled:
    """The rows of the spool in ``directory`` (empty if there is none), oldest first.

    ``max_rows``: only the newest chunks that hold that many rows or more (the rows that follow a key in
    its request are newer than it, so the newest keys find their values among them). ``skip``: names of chunks not to
    read (those folded into a datastore before). A chunk that does not check out is skipped with a
    warning; one made with another projection is a :class:`SpoolError`.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SpoolError(f"{directory}: not a directory")
    info = _check_info(directory, projection)
    parts: list[tuple[str, dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    rows = 0
    for path in reversed(chunk_files(directory) if directory.is_dir() else []):
        if path.name in skip:
            continue
        chunk = _read_chunk(path, projection)
        if chunk is None:
            continue
        parts.append((path.name, *chunk))
        rows += len(chunk[2])
        if max_rows is not None and rows >= max_rows:
            break
    parts.reverse()
    runs = {run: i for i, run in enumerate(dict.fromkeys(header["run"] for _, header, *_ in parts))}
    dim = parts[0][2].shape[1] if parts else int((info or {}).get("dim", 0))
    keys = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, dim), dtype=np.float16)
    tokens, positions, tags = (
        np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, dtype=np.int64) for i in (3, 4, 5)
    )
    run_of = np.concatenate([np.full(len(p[3]), runs[p[1]["run"]]) for p in parts]) if parts else np.zeros(0)
    # One number per request: (run, tag) pairs, numbered.
    _, groups = np.unique(np.stack([run_of.astype(np.int64), tags.astype(np.int64)]), axis=1, return_inverse=True)
    return Spooled(
        keys=keys,
        tokens=tokens.astype(np.int32),
        positions=positions.astype(np.int64),
        groups=groups.reshape(-1).astype(np.int64),
        chunks=[p[0] for p in parts],
    )


def _read_chunk(path: Path, projection: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(header, keys, tokens, positions, tags)`` of a chunk file, or None (with a warning) if it is damaged."""
    try:
        data = path.read_bytes()
        if data[: len(MAGIC)] != MAGIC:
            raise ValueError("not a spool chunk")
        (length,) = _LENGTH.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _LENGTH.size
        header = json.loads(data[start : start + length])
        payload = memoryview(data)[start + length :]
        rows, dim = int(header["rows"]), int(header["dim"])
        if len(payload) != rows * (2 * dim + 4 + 4 + 8):
            raise ValueError(f"payload of {len(payload)} bytes for {rows} rows of {dim} dimensions")
        if "sha256:" + hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise ValueError("checksum mismatch")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        logger.warning("DReSD spool: skipping %s (%s)", path, e)
        return None
    if header.get("projection") != projection:
        raise SpoolError(
            f"{path}: keys made with another projection ({header.get('projection')}) than the datastore's "
            f"({projection}); a spool can only be reloaded or folded under the projection it was written with"
        )
    sizes = np.cumsum([0, rows * dim * 2, rows * 4, rows * 4, rows * 8])
    keys = np.frombuffer(payload[sizes[0] : sizes[1]], dtype=np.float16).reshape(rows, dim)
    tokens = np.frombuffer(payload[sizes[1] : sizes[2]], dtype=np.int32)
    positions = np.frombuffer(payload[sizes[2] : sizes[3]], dtype=np.int32)
    tags = np.frombuffer(payload[sizes[3] : sizes[4]], dtype=np.int64)
    return header, keys, tokens, positions, tags


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
        if _check_info(self.directory, projection) is None:
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
                f.write(MAGIC + _LENGTH.pack(len(header)) + header + payload)

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
