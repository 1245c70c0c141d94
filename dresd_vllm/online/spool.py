"""The online store's spool: the states a server verified and the tokens they produced, kept on disk.

With ``online_store_path`` set, every verified state the proposer projects (its fp16 key) goes into
an in-memory chunk with the token it produced, its position and its request's tag. A full chunk, or
one that has waited a few seconds, goes to a background thread
(:class:`~dresd_vllm.online.spool_writer.SpoolWriter`), which writes it as one file::

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

import dataclasses
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from dresd_vllm.store.projection import Projection

# Under vLLM's logger tree, so the lines appear in the server's log.
logger = logging.getLogger(f"vllm.{__name__}")

MAGIC = b"DRESDSPL"
FORMAT = 1
INFO = "spool.json"
SUFFIX = ".chunk"
LENGTH = struct.Struct("<I")


class SpoolError(Exception):
    """A spool that cannot be used here: another projection's, or not a spool."""


def projection_id(projection: Projection) -> str:
    """sha256 of the projection's parameters: spooled keys mean something only under the same projection."""
    digest = hashlib.sha256()
    for array in (projection.mean, projection.std, projection.components, projection.pca_mean):
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return "sha256:" + digest.hexdigest()


def check_info(directory: Path, projection: str) -> dict | None:
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
    info = check_info(directory, projection)
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
        (length,) = LENGTH.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + LENGTH.size
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
