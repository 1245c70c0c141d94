"""The datastore on disk: manifest, projection, ANN index and token store.

One directory::

    manifest.json            what the store is and what it was built from (written last)
    projection.safetensors   mean, std and PCA components (see :class:`Projection`)
    index.faiss              the FAISS index over the projected keys
    tokens.npy               int32 [T]: every corpus sequence followed by n_next + 1 EOS tokens
    offsets.npy              int32 [num_keys] (int64 past 2**31 tokens): position in tokens.npy of key i's token

Key i's value is ``tokens[offsets[i] + 1 : offsets[i] + n_next + 2]``: value[0] is
the token that key i's state produced (the first-token filter compares it with the
token just sampled), value[1:] is the draft. The EOS padding after every sequence
keeps that slice in bounds without a branch. The token arrays are read into memory at load
(4 bytes a token and 4-8 a key): a memory-mapped store that an operator truncates or copies over
under a running server would kill its worker with SIGBUS at the next gather.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from dresd_vllm.atomic import fsync_dir, fsync_file, remove_stale_temps, replace_dir, sibling
from dresd_vllm.index import SearchIndex, add_keys, auto_factory, build_index, ivf_of
from dresd_vllm.projection import Projection

FORMAT_VERSION = 1

MANIFEST = "manifest.json"
PROJECTION = "projection.safetensors"
INDEX = "index.faiss"
TOKENS = "tokens.npy"
OFFSETS = "offsets.npy"

_OFFSET_SCAN_CHUNK = 1 << 24


class DatastoreError(Exception):
    """A datastore that is missing, damaged or unfit for the model; the message names the file or field."""


@dataclasses.dataclass
class Manifest:
    """What a datastore holds and what it was built from (``manifest.json``)."""

    model: str  # name or path of the target model
    hidden_size: int
    vocab_size: int
    tokenizer_fingerprint: str | None  # see tokenizer_fingerprint(); None skips the check
    template: str  # prompt template the corpus was rendered with
    n_next: int  # draft tokens stored per key (paper N = 20); each key stores n_next + 1
    pca_dim: int
    num_keys: int
    index_factory: str  # FAISS factory string; "auto" is resolved by write_datastore
    nprobe: int | None = None  # IVF lists probed per query; None for non-IVF indexes
    dtype: str | None = None  # the engine dtype the keys were embedded at ("float32"); None: not recorded
    build: dict[str, Any] = dataclasses.field(default_factory=dict)  # build parameters and timings
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST) -> Manifest:
        """Parse and validate; DatastoreError names ``source`` and the offending field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatastoreError(f"{source}: not valid JSON, the file is damaged or truncated ({e})") from e
        if not isinstance(data, dict):
            raise DatastoreError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DatastoreError(
                f"{source}: format_version is {version!r}, expected {FORMAT_VERSION} (the version this "
                "dresd_vllm reads); rebuild the datastore or use a matching dresd_vllm"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise DatastoreError(f"{source}: unknown fields {unknown} for format_version {FORMAT_VERSION}")
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if name not in data:
                if required:
                    raise DatastoreError(f"{source}: missing field {name!r}")
                continue
            if not _has_type(data[name], f.type):
                raise DatastoreError(f"{source}: field {name!r} is {data[name]!r}, expected {f.type}")
        return cls(**data)


def _has_type(value: Any, annotation: str) -> bool:
    # Annotations are strings under `from __future__ import annotations`.
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }
    checks["dict[str, Any]"] = lambda v: isinstance(v, dict)
    options = [a.strip() for a in annotation.split("|")]
    return any(value is None if a == "None" else checks[a](value) for a in options)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary (token -> id, sorted), the special tokens and the chat template.

    Works with any Hugging Face tokenizer (slow, fast, or a wrapper exposing ``get_vocab``).
    Two tokenizers with the same fingerprint map text to the same ids, so a datastore's
    token ids mean the same thing to the model.
    """
    special = getattr(tokenizer, "all_special_tokens", [])
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": sorted((tok, tokenizer.convert_tokens_to_ids(tok)) for tok in special),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def token_store_from_sequences(
    seqs: Sequence[Sequence[int] | np.ndarray], n_next: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lay token sequences out as a token store with one key per position.

    Returns ``(tokens int32 [T], offsets int64 [sum(len(s))])``: each sequence is
    followed by ``n_next + 1`` EOS tokens, and the key for position ``p`` of a
    sequence has offset ``start_of_sequence + p``, so its value is the ``n_next + 1``
    tokens after position ``p``, EOS-padded at the end of the sequence.
    """
    pad = n_next + 1
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    padded = lengths + pad
    tokens = np.full(int(padded.sum()), eos_id, dtype=np.int32)
    starts = np.concatenate(([0], np.cumsum(padded)[:-1])).astype(np.int64)
    for start, seq in zip(starts, seqs, strict=True):
        tokens[start : start + len(seq)] = seq
    # Position within its own sequence for every key, then shift by the sequence's start.
    key_starts = np.repeat(starts, lengths)
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return tokens, key_starts + within


def _check_target(path: Path) -> None:
    """Only an absent path, an empty directory or an existing datastore may be (re)placed."""
    if not path.exists():
        return
    if not path.is_dir():
        raise DatastoreError(f"{path}: exists and is not a directory; refusing to replace it with a datastore")
    if any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise DatastoreError(
            f"{path}: exists, is not empty and has no {MANIFEST}; "
            "refusing to replace a directory that is not a datastore"
        )


def write_datastore(
    path: str | os.PathLike,
    manifest: Manifest,
    projection: Projection,
    keys_or_index: np.ndarray | faiss.Index,
    tokens: np.ndarray,
    offsets: np.ndarray,
) -> Path:
    """Write a datastore directory atomically and return its path.

    ``keys_or_index`` is either the projected keys ``[num_keys, pca_dim]`` (the index
    is then built with ``manifest.index_factory``, "auto" allowed) or a built FAISS index.
    Everything goes into a hidden temporary sibling directory, each file is fsynced,
    ``manifest.json`` is written last, and the directory is renamed into place: a
    reader sees either no datastore or a complete one. An existing datastore at
    ``path`` is replaced (it steps aside to a hidden ``.old-*`` sibling for the
    instant between two renames); any other existing non-empty directory is refused.
    ``manifest.num_keys`` and, if "auto", ``index_factory`` are filled in; a set
    ``manifest.nprobe`` is stored in the index, an unset one records the index's.
    """
    path = Path(path)
    _check_target(path)
    tokens, offsets = _validated_token_store(manifest, tokens, offsets)
    build = dict(manifest.build)
    factory = manifest.index_factory
    if isinstance(keys_or_index, faiss.Index):
        if factory == "auto":
            raise DatastoreError("index_factory: 'auto' describes keys to index, not a built index; give its factory")
        index = keys_or_index
    else:
        start = time.perf_counter()
        index = build_index(keys_or_index, factory, seed=int(build.get("seed", 0)))
        factory = auto_factory(len(offsets)) if factory == "auto" else factory
        build["index_build_s"] = round(time.perf_counter() - start, 3)
    _check_parts(manifest, projection, index, len(offsets))
    ivf = ivf_of(index)
    if ivf is not None and manifest.nprobe is not None:
        ivf.nprobe = manifest.nprobe

    start = time.perf_counter()
    remove_stale_temps(path)
    tmp = sibling(path)
    tmp.mkdir(parents=True)
    try:
        projection.save(tmp / PROJECTION)
        faiss.write_index(index, str(tmp / INDEX))
        np.save(tmp / TOKENS, tokens)
        np.save(tmp / OFFSETS, offsets)
        for name in (PROJECTION, INDEX, TOKENS, OFFSETS):
            fsync_file(tmp / name)
        build["write_s"] = round(time.perf_counter() - start, 3)
        manifest = dataclasses.replace(
            manifest,
            num_keys=len(offsets),
            index_factory=factory,
            nprobe=ivf.nprobe if ivf is not None else None,
            format_version=FORMAT_VERSION,
            build=build,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        fsync_file(tmp / MANIFEST)
        _make_readable(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def append_datastore(
    path: str | os.PathLike,
    keys_or_index: np.ndarray | faiss.Index,
    tokens: np.ndarray,
    offsets: np.ndarray,
    build: dict[str, Any] | None = None,
) -> Path:
    """Add keys and their token store to the datastore at ``path``, atomically (as :func:`write_datastore`).

    The datastore keeps its projection and its trained index: the new keys, projected with
    that projection, are encoded into the index after the old ones (ids continue from
    ``num_keys``). ``keys_or_index`` is the new keys ``[n, pca_dim]``, or the datastore's
    index with the new keys already added (what a sharded build merges). ``tokens`` and
    ``offsets`` are the new part's own token store (offsets into ``tokens``). ``build``
    is recorded in the manifest's ``build["appended"]`` list.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise DatastoreError(f"{path}: no datastore to append to (missing {MANIFEST})")
    manifest = Manifest.from_json((path / MANIFEST).read_text(), source=str(path / MANIFEST))
    tokens, offsets = _validated_token_store(manifest, tokens, offsets)
    try:
        projection = Projection.load(path / PROJECTION)
    except ValueError as e:
        raise DatastoreError(str(e)) from e
    old_tokens = _load_array(path / TOKENS, np.int32)
    old_offsets = _load_array(path / OFFSETS, np.int32, np.int64)
    start = time.perf_counter()
    if isinstance(keys_or_index, faiss.Index):
        index = keys_or_index
    else:
        keys = np.asarray(keys_or_index)
        if keys.ndim != 2 or keys.shape[1] != manifest.pca_dim:
            raise DatastoreError(f"keys: expected [n, pca_dim={manifest.pca_dim}], got shape {keys.shape}")
        index = faiss.read_index(str(path / INDEX))
        add_keys(index, keys, index.ntotal)
    if index.ntotal != len(old_offsets) + len(offsets):
        raise DatastoreError(
            f"index size is {index.ntotal} but the datastore has {len(old_offsets)} keys and {len(offsets)} are added"
        )
    appended = {**(build or {}), "keys": len(offsets), "index_add_s": round(time.perf_counter() - start, 3)}
    all_build = {**manifest.build, "appended": [*manifest.build.get("appended", []), appended]}
    return write_datastore(
        path,
        dataclasses.replace(manifest, build=all_build),
        projection,
        index,
        np.concatenate([old_tokens, tokens]),
        np.concatenate([np.asarray(old_offsets, dtype=np.int64), offsets.astype(np.int64) + len(old_tokens)]),
    )


def _make_readable(directory: Path) -> None:
    """Files 0666 and directories 0777 less the umask (0644 / 0755 as usual), like any build output.

    Some writers (safetensors) create their files 0600, which a server running as another user
    could not read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for item in [directory, *directory.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _validated_token_store(
    manifest: Manifest, tokens: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    tokens, offsets = np.asarray(tokens), np.asarray(offsets)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DatastoreError(f"tokens: expected a flat integer array, got {tokens.dtype} {tokens.shape}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise DatastoreError(f"offsets: expected a flat integer array, got {offsets.dtype} {offsets.shape}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= manifest.vocab_size):
        raise DatastoreError(
            f"tokens: ids must lie in [0, vocab_size={manifest.vocab_size}), got [{tokens.min()}, {tokens.max()}]"
        )
    if len(offsets) and (offsets.min() < 0 or offsets.max() + manifest.n_next + 1 >= len(tokens)):
        raise DatastoreError(
            f"offsets: every offset + n_next + 1 must index tokens (length {len(tokens)}), "
            f"got offsets in [{offsets.min()}, {offsets.max()}] with n_next={manifest.n_next}"
        )
    # 4 bytes a key instead of 8 wherever the token store allows (2**31 tokens: ~2e9 keys).
    offset_dtype = np.int32 if len(tokens) < 2**31 else np.int64
    return tokens.astype(np.int32, copy=False), offsets.astype(offset_dtype, copy=False)


def _check_parts(manifest: Manifest, projection: Projection, index: faiss.Index, num_keys: int) -> None:
    expected = [
        ("projection hidden size", projection.hidden_size, "hidden_size", manifest.hidden_size),
        ("projection dim", projection.dim, "pca_dim", manifest.pca_dim),
        ("index dim", index.d, "pca_dim", manifest.pca_dim),
        ("index size", index.ntotal, "number of offsets", num_keys),
    ]
    for what, got, field, want in expected:
        if got != want:
            raise DatastoreError(f"{what} is {got} but {field} is {want}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise DatastoreError("index: metric must be inner product (faiss.METRIC_INNER_PRODUCT)")


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
        self.path = path
        self.manifest = manifest
        self.projection = projection
        self.index = index
        self.tokens = tokens
        self.offsets = offsets
        self._steps = np.arange(1, manifest.n_next + 2, dtype=np.int64)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        backend: str = "auto",
        device: torch.device | str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Datastore:
        """Open and validate every file; DatastoreError names the file that is missing or damaged.

        ``nprobe``/``ef_search`` None keep the values stored with the index (the manifest's nprobe).
        The projection is moved to ``device`` and the index searched with ``backend``
        (see :class:`SearchIndex`).
        """
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise DatastoreError(f"{path}: no datastore here (missing {MANIFEST})")
        manifest = Manifest.from_json((path / MANIFEST).read_text(), source=str(path / MANIFEST))
        for name in (PROJECTION, INDEX, TOKENS, OFFSETS):
            if not (path / name).is_file():
                raise DatastoreError(f"{path / name}: missing from the datastore")

        try:
            projection = Projection.load(path / PROJECTION)
        except ValueError as e:
            raise DatastoreError(str(e)) from e
        for field, got, want in (
            ("hidden_size", projection.hidden_size, manifest.hidden_size),
            ("pca_dim", projection.dim, manifest.pca_dim),
        ):
            if got != want:
                raise DatastoreError(f"{path / PROJECTION}: {field} is {got}, {MANIFEST} says {want}")

        tokens = _load_array(path / TOKENS, np.int32)
        offsets = _load_array(path / OFFSETS, np.int32, np.int64)
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
            index = SearchIndex.load(path / INDEX, backend=backend, device=device, nprobe=nprobe, ef_search=ef_search)
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
        checks = [("hidden_size", m.hidden_size, hidden_size), ("vocab_size", m.vocab_size, vocab_size)]
        if tokenizer_fingerprint is not None and m.tokenizer_fingerprint is not None:
            checks.append(("tokenizer_fingerprint", m.tokenizer_fingerprint, tokenizer_fingerprint))
        for field, ours, theirs in checks:
            if ours != theirs:
                raise DatastoreError(
                    f"datastore {self.path} does not fit the model: {field} is {ours!r} in "
                    f"{MANIFEST} (built from {m.model!r}) but the model has {theirs!r}"
                )


def _load_array(path: Path, *dtypes: type[np.generic]) -> np.ndarray:
    try:
        array = np.load(path)  # into memory, not mapped: see the module docstring
    except (ValueError, EOFError, OSError) as e:
        raise DatastoreError(f"{path}: not a readable .npy array, the file is damaged or truncated ({e})") from e
    if array.dtype not in dtypes or array.ndim != 1:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise DatastoreError(f"{path}: expected a flat {names} array, got {array.dtype} {array.shape}")
    return array
