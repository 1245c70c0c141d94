"""Reading a datastore (see :mod:`dresd_vllm.store.manifest` for its files): :class:`Datastore`.

The token arrays are read into memory at load (4 bytes a token and 4-8 a key): a memory-mapped
store that an operator truncates or copies over under a running server would kill its worker
with SIGBUS at the next gather.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dresd_vllm.index.search import SearchIndex, SearchOptions
from dresd_vllm.store.manifest import (
    INDEX,
    MANIFEST,
    OFFSETS,
    PROJECTION,
    TOKENS,
    DatastoreError,
    Manifest,
    read_array,
    read_manifest,
    read_projection,
)
from dresd_vllm.store.projection import Projection

_OFFSET_SCAN_CHUNK = 1 << 24


class Datastore:
    """A loaded datastore: manifest, projection, searchable index and token store (in memory)."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        projection: Projection,
        index: SearchIndex,
        tokens: np.ndarray,
        offsets: np.ndarray,
    ):
        """Parts already checked against each other; :meth:`load` is how a datastore is opened."""
        self.path = path
        self.manifest = manifest
        self.projection = projection
        self.index = index
        self.tokens = tokens
        self.offsets = offsets
        self._steps = np.arange(1, manifest.n_next + 2, dtype=np.int64)

    @classmethod
    def load(cls, path: str | os.PathLike, search: SearchOptions | None = None) -> Datastore:
        """Open and validate every file; DatastoreError names the file that is missing or damaged.

        The index is searched as ``search`` says (:class:`SearchOptions`: backend, device, nprobe,
        ef_search; None: the defaults); the projection is moved to the index's device.
        """
        path = Path(path)
        manifest = read_manifest(path, "no datastore here")
        for name in (PROJECTION, INDEX, TOKENS, OFFSETS):
            if not (path / name).is_file():
                raise DatastoreError(f"{path / name}: missing from the datastore")

        projection = read_projection(path)
        for field, got, want in (
            ("hidden_size", projection.hidden_size, manifest.hidden_size),
            ("pca_dim", projection.dim, manifest.pca_dim),
        ):
            if got != want:
                raise DatastoreError(f"{path / PROJECTION}: {field} is {got}, {MANIFEST} says {want}")

        tokens = read_array(path / TOKENS, np.int32)
        offsets = read_array(path / OFFSETS, np.int32, np.int64)
        if len(offsets) != manifest.num_keys:
            raise DatastoreError(
                f"{path / OFFSETS}: {len(offsets)} offsets, {MANIFEST} says num_keys={manifest.num_keys}"
            )
        for start in range(0, len(tokens), _OFFSET_SCAN_CHUNK):
            chunk = tokens[start : start + _OFFSET_SCAN_CHUNK]
            if chunk.min() < 0 or chunk.max() >= manifest.vocab_size:
                raise DatastoreError(
                    f"{path / TOKENS}: token ids must lie in [0, vocab_size={manifest.vocab_size}) of {MANIFEST}, "
                    f"found {chunk.min()}..{chunk.max()}: the token store is damaged or another datastore's; rebuild it"
                )
        limit = len(tokens) - manifest.n_next - 1
        for start in range(0, len(offsets), _OFFSET_SCAN_CHUNK):
            chunk = offsets[start : start + _OFFSET_SCAN_CHUNK]
            if chunk.min() < 0 or chunk.max() >= limit:
                raise DatastoreError(
                    f"{path / OFFSETS}: offsets must lie in [0, {limit}) for {path / TOKENS} "
                    f"of {len(tokens)} tokens and n_next={manifest.n_next}"
                )

        try:
            index = SearchIndex.load(path / INDEX, search or SearchOptions())
        except ValueError as e:
            raise DatastoreError(str(e)) from e
        for field, got, want in (
            ("num_keys", index.ntotal, manifest.num_keys),
            ("pca_dim", index.dim, manifest.pca_dim),
        ):
            if got != want:
                raise DatastoreError(f"{path / INDEX}: {field} is {got}, {MANIFEST} says {want}")
        projection.to(index.device)
        return cls(path, manifest, projection, index, tokens, offsets)

    @property
    def n_next(self) -> int:
        """Draft tokens stored per key (each key's value holds ``n_next + 1`` tokens)."""
        return self.manifest.n_next

    def first_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Value[0] (the token each key's state produced) for ``ids [...]``; -1 where ids == -1."""
        valid = ids >= 0
        out = self.tokens[self.offsets[np.where(valid, ids, 0)] + 1]
        return np.where(valid, out, -1).astype(np.int32, copy=False)

    def continuations(self, ids: np.ndarray) -> np.ndarray:
        """Values for ``ids [...]`` -> int32 ``[..., n_next + 1]``; rows of -1 where ids == -1."""
        valid = ids >= 0
        pos = self.offsets[np.where(valid, ids, 0)][..., None] + self._steps
        out = self.tokens[pos]
        out[~valid] = -1
        return out

    def check_model(self, *, hidden_size: int, vocab_size: int, tokenizer_fingerprint: str | None) -> None:
        """Refuse a model that differs from the one the datastore was built for.

        A None fingerprint (on either side) skips the tokenizer check.
        """
        m = self.manifest
        checks: list[tuple[str, int | str, int | str]] = [
            ("hidden_size", m.hidden_size, hidden_size),
            ("vocab_size", m.vocab_size, vocab_size),
        ]
        if tokenizer_fingerprint is not None and m.tokenizer_fingerprint is not None:
            checks.append(("tokenizer_fingerprint", m.tokenizer_fingerprint, tokenizer_fingerprint))
        for field, ours, theirs in checks:
            if ours != theirs:
                raise DatastoreError(
                    f"datastore {self.path} does not fit the model: {field} is {ours!r} in "
                    f"{MANIFEST} (built from {m.model!r}) but the model has {theirs!r}"
                )
