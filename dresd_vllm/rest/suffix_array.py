"""REST's datastore: a suffix array over a token corpus, and REST's exact-match draft search.

REST (He et al. 2024) finds the longest suffix of the context (16 tokens down to 2) that occurs in
the corpus, takes the continuations of up to 5000 occurrences (spread over all of them) and drafts
from their prefix trie.
vLLM verifies one chain per request, so the trie is walked along its most frequent branch.

The `draftretriever` package on PyPI (0.1.1) is ADED's fork, whose search does not match the
context's suffix, so REST's semantics are implemented here over a NumPy suffix array.
"""

import bisect
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dresd_vllm.store.atomic import write_atomic

FORMAT = "dresd-rest-v1"
SEPARATOR = -1  # between sequences: no match or continuation crosses a sequence boundary


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Suffix array of `tokens` (int32, the separator -1 included) by libdivsufsort (`pydivsufsort`).

    Built offline only (`dresd-build rest`, the `build` extra); serving reads the stored array. Unlike
    prefix doubling, its time does not grow with the longest repeat.
    """
    try:
        from pydivsufsort import divsufsort
    except ImportError as e:
        raise ImportError(f"{e}: building a REST datastore needs pip install 'dresd-vllm[build]'") from e

    tokens = np.asarray(tokens, dtype=np.int32)
    if not len(tokens):
        return np.zeros(0, dtype=np.int32)
    # divsufsort sorts integers as big-endian bytes after flipping the sign bit, i.e. in signed order.
    order = divsufsort(tokens)
    return order.astype(np.int32 if len(tokens) < 2**31 else np.int64, copy=False)


def write_rest_datastore(path: str | os.PathLike, sequences: Sequence[Sequence[int]], metadata: dict) -> Path:
    """Write sequences and their suffix array to one `.npz` file, atomically (see :mod:`dresd_vllm.store.atomic`)."""
    path = Path(path)
    parts = [np.append(np.asarray(seq, dtype=np.int32), np.int32(SEPARATOR)) for seq in sequences]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    header = json.dumps({"format": FORMAT, "num_tokens": len(tokens), **metadata})
    order = suffix_array(tokens)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, tokens=tokens, suffix_array=order, header=np.array(header))

    return write_atomic(path, save)


def spread_sample(matches: np.ndarray, max_matches: int) -> np.ndarray:
    """At most `max_matches` of `matches`, evenly spaced over the whole range.

    A match range of the suffix array is sorted by what follows the match, so each continuation is
    one contiguous block: the first `max_matches` would favour continuations with small token ids,
    while evenly spaced picks give every block its share of the range (within one), deterministically.
    REST itself samples the matches at random for the same reason.
    """
    if len(matches) <= max_matches:
        return matches
    # The middle of each of `max_matches` equal strata.
    return matches[(2 * np.arange(max_matches) + 1) * len(matches) // (2 * max_matches)]


def check_rest_file(path: str | os.PathLike) -> None:
    """ValueError unless `path` is a `.npz` archive, as `dresd-build rest` writes, saying what it is instead."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        what = "a single NumPy array (.npy)" if f.read(6) == b"\x93NUMPY" else "not a .npz archive"
    raise ValueError(
        f"REST 'datastore': {path} is {what}; a REST datastore is the .npz file (tokens, suffix_array, header) "
        "that `dresd-build rest` writes"
    )


class SuffixArrayStore:
    """A loaded REST datastore; `draft(context, max_len)` is REST's search, merged into one chain."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"REST 'datastore': {path} is not a file; write one with `dresd-build rest`")
        check_rest_file(path)
        try:
            with np.load(path) as data:
                self.header = json.loads(str(data["header"]))
                self.tokens = data["tokens"]
                self.suffixes = data["suffix_array"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"REST 'datastore': {path} is not a readable `dresd-build rest` file ({e})") from e
        if self.header.get("format") != FORMAT or len(self.suffixes) != len(self.tokens):
            raise ValueError(f"REST 'datastore': {path} has format {self.header.get('format')!r}, expected {FORMAT!r}")

    def occurrences(self, pattern: Sequence[int] | np.ndarray) -> np.ndarray:
        """Corpus positions where `pattern` starts, in suffix-array order."""
        pattern = tuple(pattern)
        tokens, width = self.tokens, len(pattern)

        def prefix(position: int) -> tuple:
            return tuple(tokens[position : position + width].tolist())

        lo = bisect.bisect_left(self.suffixes, pattern, key=prefix)
        hi = bisect.bisect_right(self.suffixes, pattern, lo=lo, key=prefix)
        return self.suffixes[lo:hi]

    def draft(
        self,
        context: np.ndarray,
        max_len: int,
        max_span: int = 16,
        min_span: int = 2,
        max_matches: int = 5000,
        min_support: float = 0.2,
    ) -> list[int]:
        """REST: longest context suffix with a match, its continuations' most frequent branch.

        The chain stops where the branch holds less than `min_support` of the matches.
        """
        if max_len <= 0:
            return []
        for span in range(min(max_span, len(context)), min_span - 1, -1):
            starts = spread_sample(self.occurrences(context[-span:]), max_matches)
            if len(starts):
                break
        else:
            return []
        ends = starts.astype(np.int64) + span
        window = np.arange(max_len)
        positions = np.minimum(ends[:, None] + window, len(self.tokens) - 1)
        continuations = np.where(ends[:, None] + window < len(self.tokens), self.tokens[positions], SEPARATOR)
        chain: list[int] = []
        alive = continuations
        for depth in range(max_len):
            column = alive[:, depth]
            column = column[column != SEPARATOR]
            if not len(column):
                break
            values, counts = np.unique(column, return_counts=True)
            best = counts.argmax()
            if counts[best] < min_support * len(continuations):
                break
            chain.append(int(values[best]))
            alive = alive[alive[:, depth] == values[best]]
        return chain
