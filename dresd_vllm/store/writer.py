"""Writing a datastore: a new one, or keys appended to one, atomically (see :mod:`dresd_vllm.store.manifest`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dresd_vllm.index.build import add_keys, auto_factory, build_index, ivf_of
from dresd_vllm.store.atomic import fsync_dir, fsync_file, remove_stale_temps, replace_dir, sibling
from dresd_vllm.store.manifest import (
    FORMAT_VERSION,
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
    manifest = read_manifest(path, "no datastore to append to")
    tokens, offsets = _validated_token_store(manifest, tokens, offsets)
    projection = read_projection(path)
    old_tokens = read_array(path / TOKENS, np.int32)
    old_offsets = read_array(path / OFFSETS, np.int32, np.int64)
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
