"""A datastore's layout and its schema: the file names, ``manifest.json``, and reading the parts back.

One directory::

    manifest.json            what the store is and what it was built from (written last)
    projection.safetensors   mean, std and PCA components (see :class:`Projection`)
    index.faiss              the FAISS index over the projected keys
    tokens.npy               int32 [T]: every corpus sequence followed by n_next + 1 EOS tokens
    offsets.npy              int32 [num_keys] (int64 past 2**31 tokens): position in tokens.npy of key i's token

Key i's value is ``tokens[offsets[i] + 1 : offsets[i] + n_next + 2]``: value[0] is
the token that key i's state produced (the first-token filter compares it with the
token just sampled), value[1:] is the draft. The EOS padding after every sequence
keeps that slice in bounds without a branch. :mod:`dresd_vllm.store.writer` writes
a datastore, :class:`dresd_vllm.store.datastore.Datastore` reads one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from dresd_vllm.store.projection import Projection

FORMAT_VERSION = 1

MANIFEST = "manifest.json"
PROJECTION = "projection.safetensors"
INDEX = "index.faiss"
TOKENS = "tokens.npy"
OFFSETS = "offsets.npy"


class DatastoreError(Exception):
    """A datastore that is missing, damaged or unfit for the model; the message names the file or field."""


@dataclass(config=ConfigDict(strict=True, extra="forbid"))
class Manifest:
    """What a datastore holds and what it was built from (``manifest.json``).

    Checked by pydantic whenever one is made (strict: JSON ``true`` or ``2.0`` is not a count),
    so a manifest that is written is one that reads back.
    """

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
        """The ``manifest.json`` text (sorted keys, so equal manifests are equal files)."""
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
        try:
            return cls(**data)
        except ValidationError as e:
            raise DatastoreError(f"{source}: {_explain(e.errors(), data)}") from None


def _explain(errors: list[Any], data: dict[str, Any]) -> str:
    """The first problem, in the words of a manifest: unknown fields (all of them), a missing one, a bad value."""
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "unexpected_keyword_argument")
    if unknown:
        return f"unknown fields {unknown} for format_version {FORMAT_VERSION}"
    name = str(errors[0]["loc"][0])
    if errors[0]["type"] == "missing":
        return f"missing field {name!r}"
    expected = {f.name: f.type for f in dataclasses.fields(Manifest)}[name]  # the annotation, e.g. "int | None"
    return f"field {name!r} is {data[name]!r}, expected {expected}"


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


def read_manifest(path: Path, missing: str) -> Manifest:
    """The manifest of the datastore directory ``path``; ``missing`` says what its absence means."""
    if not (path / MANIFEST).is_file():
        raise DatastoreError(f"{path}: {missing} (missing {MANIFEST})")
    return Manifest.from_json((path / MANIFEST).read_text(), source=str(path / MANIFEST))


def read_projection(path: Path) -> Projection:
    """The projection of the datastore directory ``path``; DatastoreError if it is damaged."""
    try:
        return Projection.load(path / PROJECTION)
    except ValueError as e:
        raise DatastoreError(str(e)) from e


def read_array(path: Path, *dtypes: type[np.generic]) -> np.ndarray:
    """A flat ``.npy`` array of one of ``dtypes``, read into memory (see :mod:`dresd_vllm.store.datastore`)."""
    try:
        array = np.load(path)
    except (ValueError, EOFError, OSError) as e:
        raise DatastoreError(f"{path}: not a readable .npy array, the file is damaged or truncated ({e})") from e
    if array.dtype not in dtypes or array.ndim != 1:
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise DatastoreError(f"{path}: expected a flat {names} array, got {array.dtype} {array.shape}")
    return array
