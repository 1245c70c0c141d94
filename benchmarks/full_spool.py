"""A spool that fills the online store from an engine's first step (issue 23's full-store target).

    python -m benchmarks.full_spool --datastore build/demo/dresd-id --keys 100000 --out build/demo/full-spool

A server fills its online store (``online_store_size``, 100,000 keys by default) within hours, but a
benchmark's engine starts empty and serves a few hundred tokens. This writes a spool of ``--keys``
states taken from a datastore, in the format and through the writer a server uses
(:mod:`dresd_vllm.online.spool`), so that an engine given ``"online_store_path": OUT`` reloads a full store at
start-up, e.g. ``dresd-bench compare ... --method-config 'dresd-FULL+context={"online_store_path": OUT}'``.

The states are the datastore's own keys (decoded from its index: exact for Flat and SQfp16, approximate
for PQ) for a window of consecutive key ids, each with the token its state produced; a run of
consecutive keys of one corpus sequence is spooled as one request, so a reload joins each key's value
from the tokens that follow it, as it does for served states. A window longer than the datastore
wraps around (the copies are separate requests): a server that keeps answering alike holds repeats too.

The chunks are renamed to sort after every chunk a server writes later (chunk names start with the time
they were made), so when ``--keys`` reaches the engine's ``online_store_size`` every start reloads
exactly these keys, whatever the runs before it appended to the directory: rounds of a comparison
start alike. A smaller spool is reloaded together with what earlier runs appended. A benchmark spool,
not served traffic: never fold it into a datastore with ``dresd-build datastore --append --spool``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from build_tools.cli import positive_int
from dresd_vllm.config import DresdConfig
from dresd_vllm.index.build import read_keys
from dresd_vllm.index.search import SearchOptions
from dresd_vllm.online.spool import SUFFIX, chunk_files, projection_id
from dresd_vllm.online.spool_writer import CHUNK_ROWS, SpoolWriter
from dresd_vllm.spec.drafting import Drafter
from dresd_vllm.store.atomic import replace_dir, sibling
from dresd_vllm.store.datastore import Datastore
from dresd_vllm.store.manifest import DatastoreError

# Chunk names of this tool start with this instead of a time: later than any time a writer stamps.
PINNED = "9" * 20
ONLINE_STORE_SIZE = DresdConfig.model_fields["online_store_size"].default


def window(num_keys: int, count: int, start: int) -> np.ndarray:
    """``count`` consecutive key ids from ``start``, wrapping around a datastore of ``num_keys``."""
    return (start + np.arange(count, dtype=np.int64)) % num_keys


def as_requests(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tags, positions)`` of keys at token-store ``offsets``: a run of consecutive offsets is one
    request (a corpus sequence, or the part of it in the window), numbered in order, its keys at
    positions 0, 1, ..."""
    starts = np.ones(len(offsets), dtype=bool)
    starts[1:] = offsets[1:] != offsets[:-1] + 1
    tags = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    positions = np.arange(len(offsets)) - first[tags]
    return tags.astype(np.int64), positions.astype(np.int32)


def write_spool(datastore: Datastore, ids: np.ndarray, out: Path, chunk_rows: int = CHUNK_ROWS) -> int:
    """Spool the keys ``ids`` of ``datastore`` (in order) into the new directory ``out``, ``chunk_rows`` keys a
    chunk file; returns the number of chunk files."""
    index = datastore.index.index
    if index is None:
        raise ValueError("the datastore must be loaded with a FAISS backend to read its keys back")
    tags, positions = as_requests(datastore.offsets[ids])
    tokens = datastore.first_tokens(ids)
    chunks = -(-len(ids) // chunk_rows)
    # Room in the writer's queue for every chunk: a benchmark spool is written whole, never dropped.
    writer = SpoolWriter(
        out,
        projection_id(datastore.projection),
        datastore.manifest.pca_dim,
        max_bytes=1 << 62,
        chunk_rows=chunk_rows,
        queued=chunks + 1,
    )
    for start in range(0, len(ids), chunk_rows):
        part = slice(start, start + chunk_rows)
        keys = read_keys(index, ids[part], "cpu", torch.float16)
        writer.append(keys, tokens[part], positions[part], tags[part])
    writer.close()
    if writer.errors or writer.dropped_rows or writer.written_rows != len(ids):
        raise OSError(
            f"{out}: the spool writer wrote {writer.written_rows} of {len(ids)} keys "
            f"({writer.dropped_rows} dropped, {writer.errors} failed writes; see the log above)"
        )
    for path in chunk_files(out):
        path.rename(path.with_name(PINNED + path.name[len(PINNED) :]))
    return len(chunk_files(out))


def reload(datastore: Datastore, spool: Path, online_store_size: int) -> tuple[int, int]:
    """``(keys reloaded, keys in the online store)`` of a drafter started on ``spool``, as an engine starts one."""
    config = DresdConfig.from_dict(
        {
            "datastore": str(datastore.path),
            "online_store_path": str(spool),
            "online_store_size": online_store_size,
            "context": False,  # the reload is all this looks at
        }
    )
    drafter = Drafter(datastore, config, max_num_seqs=1)
    try:
        assert drafter.online is not None  # online_store is on by default, and a spool needs it
        return drafter.stats.reloaded_keys, len(drafter.online)
    finally:
        drafter.close()


def parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.full_spool",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--datastore", required=True, help="directory written by `dresd-build datastore`")
    p.add_argument("--keys", type=positive_int, required=True, help="states to spool, e.g. 100000 (a full store)")
    p.add_argument("--out", required=True, help="the spool directory to create (refused if it exists)")
    p.add_argument(
        "--online-store-size",
        type=positive_int,
        default=ONLINE_STORE_SIZE,
        help=f"the engine's online_store_size, for the reload check (default: {ONLINE_STORE_SIZE})",
    )
    p.add_argument("--seed", type=int, default=0, help="picks the window's first key id (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the spool, reload it as an engine would and print what the store holds; 2 on bad input."""
    args = parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"full_spool: error: {out} exists; delete it or name another --out", file=sys.stderr)
        return 2
    try:
        datastore = Datastore.load(args.datastore, SearchOptions(backend="faiss", device="cpu"))
    except DatastoreError as e:
        print(f"full_spool: error: {e}", file=sys.stderr)
        return 2
    num_keys = datastore.manifest.num_keys
    ids = window(num_keys, args.keys, int(np.random.default_rng(args.seed).integers(num_keys)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out)
    try:
        chunks = write_spool(datastore, ids, tmp)
        reloaded, held = reload(datastore, tmp, args.online_store_size)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size_mb = sum(p.stat().st_size for p in out.glob(f"*{SUFFIX}")) / 1e6
    print(
        f"{out}: {args.keys} keys of {datastore.manifest.pca_dim} dims from {datastore.path} ({num_keys} keys"
        f"{', wrapped around' if args.keys > num_keys else ''}), {chunks} chunks, {size_mb:.1f} MB. A drafter with "
        f"online_store_size={args.online_store_size} reloads {reloaded} and starts with {held} keys in its online store"
    )
    if args.keys < args.online_store_size:
        print(f"note: fewer keys than online_store_size: what each run appends to {out} is reloaded by the next")
    return 0


if __name__ == "__main__":
    sys.exit(main())
