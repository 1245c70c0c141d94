"""`dresd-build datastore`: corpus -> token sequences -> hidden states -> projection -> index -> datastore.

Stages, each resumable from the work directory `OUT.partial/` next to the output:

    tokenize   template(prompt) + response per row, cut to --max-length (redone by every run)
    fit        embed a seeded random sample of sequences, fit the projection -> projection.safetensors
    embed      embed every sequence, shard by shard, project each state   -> shards/NNNNN.npy
    index      train the index on a sample of the keys (trained.faiss), encode each shard into it
               (index/NNNNN.faiss, on Ray workers with --ray), merge the shards in key order, write
               the token store and OUT atomically, remove OUT.partial

With --append, OUT is an existing datastore: its projection replaces the fit stage, its trained
index the training, and the new keys and tokens are added after its own (ids continue). With
--append --spool DIR..., the corpus is what servers verified (their `online_store_path` spools): the
keys are already projected with OUT's projection, so no stage runs the model (:func:`append_spools`).

Embedding twice (the sample, then everything) costs about pca_sample extra positions but means no
stage ever holds raw hidden states of the whole corpus: shards are fp16 keys of pca_dim (128 bytes
per position at d=64) instead of hidden_size floats, and the index stage holds one shard of keys
at a time next to the merged index's codes. `plan.json` in the work directory records
everything the shards depend on; a rerun with a different model, tokenizer or setting refuses to
mix its work with the old (or discards it with --overwrite). OUT only ever appears complete.
"""

import hashlib
import json
import shutil
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from build_tools.data import Corpus, InputError, Template, differences, encode_corpus, load_rows
from build_tools.embed import (
    EmbedWorker,
    check_length,
    first_result,
    load_tokenizer,
    model_info,
    plan_shards,
    shard_task,
)
from build_tools.index_shards import IndexWorker, index_task
from build_tools.ray_jobs import ShardRunner
from dresd_vllm.index.build import (
    add_keys,
    auto_factory,
    empty_copy,
    merge_shard,
    mergeable,
    new_index,
    set_search_defaults,
    train_index,
    train_rows,
)
from dresd_vllm.online.spool import INFO as SPOOL_INFO
from dresd_vllm.online.spool import SpoolError, projection_id, read_spool
from dresd_vllm.store.atomic import write_atomic
from dresd_vllm.store.manifest import INDEX, MANIFEST, PROJECTION, DatastoreError, Manifest
from dresd_vllm.store.manifest import tokenizer_fingerprint as fingerprint_of
from dresd_vllm.store.projection import Projection
from dresd_vllm.store.writer import append_datastore, token_store_from_sequences, write_datastore

# Raw fp32 states of one sample shard travel as one Arrow binary value (< 2 GiB): 32k positions is
# 1 GiB at hidden size 8192.
SAMPLE_SHARD_TOKENS = 32_768
# Fields a partial build cannot be resumed across; named first when they differ.
MODEL_FIELDS = ("model", "hidden_size", "vocab_size", "tokenizer_fingerprint")


def work_dir(out: Path) -> Path:
    """Where the stages of a build of `out` keep their results until the datastore is written."""
    return out.with_name(out.name + ".partial")


def _npy_saver(array: np.ndarray) -> Any:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return save


def plan_of(args: Namespace, tokenizer: Any, corpus: Corpus) -> dict[str, Any]:
    """Everything the work directory's contents depend on."""
    info = model_info(args.model, **args.hf)
    return dict(
        model=args.model,
        dtype=args.engine_args.get("dtype"),
        hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        tokenizer_fingerprint=fingerprint_of(tokenizer),
        template=args.template,
        dataset=args.dataset,
        split=args.split,
        prompt_key=args.prompt_key,
        response_key=args.response_key,
        limit=args.limit,
        max_length=args.max_length,
        pca_dim=args.pca_dim,
        pca_sample=args.pca_sample,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        corpus=corpus_digest(corpus),
    )


def check_output(out: Path, request: dict[str, Any], overwrite: bool) -> bool:
    """True if `out` already holds the datastore `request` describes; InputError if it holds another."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()):
            raise InputError(f"--out {out}: a non-empty directory that is not a datastore; choose another --out")
        return False
    try:
        manifest = Manifest.from_json((out / MANIFEST).read_text(), source=str(out / MANIFEST))
    except DatastoreError as e:
        if overwrite:
            return False
        raise InputError(f"--out {out}: holds an unreadable datastore ({e}); pass --overwrite to replace it") from e
    old = manifest.build.get("request", {})
    if old == request:
        return True
    if overwrite:
        return False
    diffs = "; ".join(differences(old, request, MODEL_FIELDS))
    raise InputError(
        f"--out {out} already holds a different datastore ({diffs}); "
        "pass --overwrite to replace it or choose another --out"
    )


def open_work(work: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Create the work directory, or check that the one there belongs to this plan."""
    plan_file = work / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old == plan:
            return
        if not overwrite:
            model_diffs = [d for d in differences(old, plan, MODEL_FIELDS) if d.split(":")[0] in MODEL_FIELDS]
            what = "a different model" if model_diffs else "different settings"
            raise InputError(
                f"cannot resume the partial build in {work}: it was started with {what} "
                f"({'; '.join(differences(old, plan, MODEL_FIELDS))}). Rerun with the same arguments to resume, "
                "or pass --overwrite to discard it and start over"
            )
    if work.exists():
        shutil.rmtree(work)
    (work / "shards").mkdir(parents=True)
    write_atomic(plan_file, lambda tmp: tmp.write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n"))


def read_corpus(args: Namespace, tokenizer: Any) -> Corpus:
    """The dataset as token sequences; every input error surfaces here, before anything is written."""
    rows = load_rows(args.dataset, args.split, args.limit)
    if not rows:
        raise InputError(f"--dataset {args.dataset}: no rows (split {args.split!r})")
    template = Template(args.template, tokenizer)
    return encode_corpus(rows, template, args.prompt_key, args.response_key, args.max_length)


def corpus_digest(corpus: Corpus) -> str:
    """sha256 of the token sequences: a rerun over an edited dataset must not reuse old shards."""
    h = hashlib.sha256(corpus.lengths.tobytes())
    h.update(corpus.tokens.tobytes())
    return "sha256:" + h.hexdigest()


def embed_tasks(corpus: Corpus, seqs: np.ndarray, shard_tokens: int) -> list[dict[str, Any]]:
    """Shard tasks over the sequences `seqs` (indices into the corpus, ascending)."""
    starts = np.concatenate(([0], np.cumsum(corpus.lengths)))
    tasks = []
    for shard, (a, b) in enumerate(plan_shards(corpus.lengths[seqs], shard_tokens)):
        chosen = seqs[a:b]
        tokens = np.concatenate([corpus.tokens[starts[i] : starts[i + 1]] for i in chosen])
        tasks.append(shard_task(shard, tokens, corpus.lengths[chosen]))
    return tasks


def fit_stage(args: Namespace, corpus: Corpus, runner: ShardRunner, work: Path) -> Projection:
    """Fit the projection on the states of a seeded random sample of sequences (about pca_sample positions)."""
    path = work / "projection.safetensors"
    if path.is_file():
        return Projection.load(path)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(corpus.lengths))
    enough = int(np.searchsorted(np.cumsum(corpus.lengths[order]), args.pca_sample)) + 1
    chosen = np.sort(order[:enough])
    tasks = embed_tasks(corpus, chosen, SAMPLE_SHARD_TOKENS)
    # Shards arrive in any order on Ray; each has its fixed rows in one preallocated array.
    rows = np.cumsum([0] + [int(np.frombuffer(t["lengths"], dtype=np.int64).sum()) for t in tasks])
    states = np.empty((rows[-1], model_info(args.model, **args.hf).hidden_size), dtype=np.float32)
    with tqdm(total=rows[-1], desc="fit: embed sample (starting engine)", unit="tok", unit_scale=True) as bar:
        for result in runner.run(tasks, projection=None):
            if "fit" not in runner.startup_s:
                runner.startup_s["fit"] = first_result(bar, "fit: embed sample", result["seconds"])
            shard = result["shard"]
            states[rows[shard] : rows[shard + 1]] = np.frombuffer(result["data"], dtype=np.float32).reshape(
                -1, states.shape[1]
            )
            bar.update(result["positions"])
    try:
        projection = Projection.fit(states, dim=args.pca_dim, sample_size=args.pca_sample, seed=args.seed)
    except ValueError as e:
        raise InputError(f"cannot fit the projection on {len(states)} states: {e}") from e
    write_atomic(path, projection.save)
    return projection


def embed_stage(
    args: Namespace, corpus: Corpus, projection: Projection, runner: ShardRunner, work: Path
) -> tuple[list[Path], int]:
    """The shard files of projected keys of every position, in key order, and how many positions this
    run embedded. Finished shards of an earlier run are kept.
    """
    tasks = embed_tasks(corpus, np.arange(len(corpus.lengths)), args.shard_tokens)
    sizes = {t["shard"]: int(np.frombuffer(t["lengths"], dtype=np.int64).sum()) for t in tasks}

    def shard_path(shard: int) -> Path:
        return work / "shards" / f"{shard:05d}.npy"

    def finished(shard: int) -> bool:
        try:
            keys = np.load(shard_path(shard), mmap_mode="r")
        except (OSError, ValueError):
            return False
        return keys.shape == (sizes[shard], args.pca_dim) and keys.dtype == np.float16

    pending = [t for t in tasks if not finished(t["shard"])]
    todo = sum(sizes[t["shard"]] for t in pending)
    total = sum(sizes.values())
    starting = "embed (starting engine)" if runner.use_ray or runner._worker is None else "embed"
    with tqdm(total=total, initial=total - todo, desc=starting, unit="tok", unit_scale=True) as bar:
        for result in runner.run(pending, projection=projection):
            if "embed" not in runner.startup_s:
                runner.startup_s["embed"] = first_result(bar, "embed", result["seconds"])
            keys = np.frombuffer(result["data"], dtype=np.float16).reshape(-1, args.pca_dim)
            write_atomic(shard_path(result["shard"]), _npy_saver(keys))
            # Index work made from an earlier version of this shard is stale now.
            (work / "index" / f"{result['shard']:05d}.faiss").unlink(missing_ok=True)
            (work / "trained.faiss").unlink(missing_ok=True)
            bar.update(result["positions"])
    return [shard_path(t["shard"]) for t in tasks], todo


def _train_sample(shards: list[Path], sizes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Keys ``rows`` (sorted, global) gathered from the shard files, one shard in memory at a time."""
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    parts = []
    for i, path in enumerate(shards):
        mine = rows[(rows >= bounds[i]) & (rows < bounds[i + 1])] - bounds[i]
        if len(mine):
            parts.append(np.load(path, mmap_mode="r")[mine])
    return np.concatenate(parts)


def index_stage(args: Namespace, shards: list[Path], work: Path, base: faiss.Index | None, factory: str) -> faiss.Index:
    """The index over the keys in ``shards``: ``base`` (an existing datastore's index) extended, or a new
    ``factory`` index trained on a seeded sample of the keys. Shards are encoded by `IndexWorker`s (on
    Ray with --ray) and merged in key order; encoded shards of an earlier run are kept.
    """
    sizes = np.array([np.load(p, mmap_mode="r").shape[0] for p in shards], dtype=np.int64)
    first = base.ntotal if base is not None else 0
    if base is None:
        trained_path = work / "trained.faiss"
        if trained_path.is_file():
            index = faiss.read_index(str(trained_path))
        else:
            index = new_index(args.pca_dim, factory)
            rows = train_rows(int(sizes.sum()), index, args.seed)
            if len(rows):
                with tqdm(total=len(rows), desc="index: train", unit="key", unit_scale=True) as bar:
                    train_index(index, _train_sample(shards, sizes, rows), args.seed)
                    bar.update(len(rows))
            write_atomic(trained_path, lambda tmp: faiss.write_index(index, str(tmp)))
    else:
        index = base
    if not mergeable(index):
        # Graph indexes (HNSW) insert one key at a time against the keys before it: one process.
        for path in tqdm(shards, desc="index: add", unit="shard"):
            add_keys(index, np.load(path), index.ntotal)
        if base is None:
            set_search_defaults(index)
        return index

    trained = empty_copy(index) if base is not None else index
    out_dir = work / "index"
    out_dir.mkdir(exist_ok=True)
    starts = first + np.concatenate(([0], np.cumsum(sizes)[:-1]))
    tasks = [index_task(i, str(p), int(s)) for i, (p, s) in enumerate(zip(shards, starts, strict=True))]
    pending = [t for t in tasks if not (out_dir / f"{t['shard']:05d}.faiss").is_file()]
    runner = ShardRunner(
        IndexWorker,
        dict(trained=faiss.serialize_index(trained).tobytes(), threads=1 if args.use_ray else None),
        use_ray=args.use_ray,
        num_workers=args.ray_workers,
        cpu_only=True,
    )
    done = int(sizes.sum() - sum(sizes[t["shard"]] for t in pending))
    try:
        with tqdm(total=int(sizes.sum()), initial=done, desc="index: encode", unit="key", unit_scale=True) as bar:
            for result in runner.run(pending):
                data = np.frombuffer(result["data"], dtype=np.uint8)
                write_atomic(out_dir / f"{result['shard']:05d}.faiss", lambda tmp, d=data: d.tofile(tmp))
                bar.update(result["positions"])
    finally:
        runner.close()
    merged = index if base is not None else empty_copy(trained)
    for task in tqdm(tasks, desc="index: merge", unit="shard"):
        merge_shard(merged, faiss.read_index(str(out_dir / f"{task['shard']:05d}.faiss")))
    if base is None:
        set_search_defaults(merged)
    return merged


def _append_target(out: Path) -> Manifest:
    """The manifest of the datastore at `out` that --append adds to; an InputError if there is none to read."""
    if not (out / MANIFEST).is_file():
        raise InputError(f"--append: {out} holds no datastore to append to (no {MANIFEST}); build it first")
    try:
        return Manifest.from_json((out / MANIFEST).read_text(), source=str(out / MANIFEST))
    except DatastoreError as e:
        raise InputError(f"--append: {e}") from e


def _base_of(args: Namespace, out: Path, plan: dict[str, Any]) -> Manifest | None:
    """With --append, the manifest of the datastore at `out` after checking that the corpus fits it."""
    if not args.append:
        return None
    base = _append_target(out)
    ours = {**{k: plan[k] for k in MODEL_FIELDS}, "template": args.template, "n_next": args.n_next}
    ours["pca_dim"] = args.pca_dim
    for field, value in ours.items():
        if getattr(base, field) != value:
            raise InputError(
                f"--append: {out} was built with {field}={getattr(base, field)!r}, this corpus asks for {value!r}; "
                f"append with the same {field} (the keys and values must mean what the datastore's mean)"
            )
    return base


def numerics(engine_args: dict[str, Any]) -> dict[str, Any]:
    """What decides the keys' numbers besides the model: dtype, vLLM, torch, device (and any quantization)."""
    import torch
    import vllm
    from vllm.platforms import current_platform

    keys = ("dtype", "quantization", "kv_cache_dtype", "enforce_eager")
    return dict(
        **{k: engine_args[k] for k in keys if k in engine_args},
        vllm=vllm.__version__,
        torch=torch.__version__,
        device=current_platform.device_type,
    )


def run_datastore(args: Namespace) -> dict[str, Any]:
    """The `datastore` command; returns the build summary (also recorded in the manifest)."""
    out = Path(args.out)
    check_length(args.model, args.max_length, **args.hf)
    tokenizer = load_tokenizer(args.model, **args.hf)
    if tokenizer.eos_token_id is None:
        raise InputError(f"the tokenizer of {args.model!r} has no EOS token, which pads the token store")
    if args.spool:
        return append_spools(args, tokenizer)
    try:
        faiss.index_factory(args.pca_dim, "Flat" if args.index == "auto" else args.index)
    except RuntimeError as e:
        raise InputError(f"--index {args.index!r}: not a FAISS factory string ({str(e).splitlines()[0]})") from e

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = read_corpus(args, tokenizer)
    times["tokenize"] = time.perf_counter() - t0
    plan = plan_of(args, tokenizer, corpus)
    request = {**plan, "n_next": args.n_next, "index": args.index}
    base = _base_of(args, out, plan)
    if base is not None:
        if any(a.get("request") == request for a in base.build.get("appended", [])):
            print(f"{out}: already holds this corpus (appended before); nothing to do")
            return {}
        # The work directory belongs to this append onto this datastore, not to another.
        plan["append_to"] = {"num_keys": base.num_keys, "index": base.index_factory}
    elif check_output(out, request, args.overwrite):
        print(f"{out}: already holds this datastore; nothing to do (pass --overwrite to rebuild)")
        return {}
    work = work_dir(out)
    open_work(work, plan, args.overwrite)
    runner = ShardRunner(
        EmbedWorker,
        dict(model=args.model, max_length=args.max_length, engine_args=args.engine_args),
        use_ray=args.use_ray,
        num_workers=args.ray_workers,
    )
    try:
        t0 = time.perf_counter()
        projection = Projection.load(out / PROJECTION) if base is not None else fit_stage(args, corpus, runner, work)
        times["fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        shards, embedded = embed_stage(args, corpus, projection, runner, work)
        times["embed"] = time.perf_counter() - t0
    finally:
        runner.close()
    # Engine start-up is timed on its own: fit and embed count from their first token.
    for stage, secs in runner.startup_s.items():
        times[stage] -= secs
    times["engine_start"] = sum(runner.startup_s.values())

    t0 = time.perf_counter()
    num_keys = int(corpus.lengths.sum())
    factory = base.index_factory if base is not None else args.index
    factory = auto_factory(num_keys) if factory == "auto" else factory
    index = index_stage(args, shards, work, faiss.read_index(str(out / INDEX)) if base is not None else None, factory)
    times["index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens, offsets = token_store_from_sequences(corpus.sequences(), args.n_next, tokenizer.eos_token_id)
    build = dict(
        request=request,
        corpus=corpus.summary(),
        seed=args.seed,
        ray=args.use_ray,
        numerics=numerics(args.engine_args),
        stage_s={k: round(v, 3) for k, v in times.items()},
    )
    if base is not None:
        append_datastore(out, index, tokens, offsets, build=build)
    else:
        manifest = Manifest(
            model=args.model,
            hidden_size=plan["hidden_size"],
            vocab_size=plan["vocab_size"],
            tokenizer_fingerprint=plan["tokenizer_fingerprint"],
            template=args.template,
            n_next=args.n_next,
            pca_dim=args.pca_dim,
            num_keys=num_keys,
            index_factory=factory,
            dtype=args.engine_args.get("dtype"),
            build=build,
        )
        write_datastore(out, manifest, projection, index, tokens, offsets)
    times["write"] = time.perf_counter() - t0
    shutil.rmtree(work)
    written = Manifest.from_json((out / MANIFEST).read_text())
    size = sum(f.stat().st_size for f in out.iterdir())
    summary = dict(
        out=str(out),
        **corpus.summary(),
        keys=written.num_keys,
        appended_keys=num_keys if base is not None else None,
        index=written.index_factory,
        bytes=size,
        bytes_per_key=size / max(written.num_keys, 1),
        stage_s=times,
        embedded_tokens=embedded,
        embed_tokens_per_s=embedded / times["embed"] if embedded else None,
    )
    print_summary(summary)
    return summary


def append_spools(args: Namespace, tokenizer: Any) -> dict[str, Any]:
    """`datastore --append --spool DIR...`: fold the states servers spooled into the datastore at --out.

    The spooled keys were projected with the datastore's own projection (checked: the spool records
    it), so they are added to its index as they are; their values are the tokens the same request
    produced next, EOS where the spool's rows of it end. Chunks recorded in the manifest as folded
    before are skipped, so the same command can run again as the spools grow.
    """
    out = Path(args.out)
    if not args.append:
        raise InputError("--spool folds served states into an existing datastore: give --append and its --out")
    base = _append_target(out)
    if base.tokenizer_fingerprint not in (None, fingerprint_of(tokenizer)):
        raise InputError(
            f"--append --spool: the tokenizer of --model {args.model!r} is not the one {out} was built with "
            f"({base.model!r}); give the datastore's model (its EOS ends the spooled values)"
        )
    identity = projection_id(Projection.load(out / PROJECTION))
    folded = frozenset(c for a in base.build.get("appended", []) for c in a.get("spool_chunks", []))
    spooled = []
    for directory in args.spool:
        if not (Path(directory) / SPOOL_INFO).is_file():
            raise InputError(f"--spool {directory}: not a spool (no {SPOOL_INFO}); give a server's online_store_path")
        try:
            spooled.append(read_spool(directory, identity, skip=folded))
        except SpoolError as e:
            raise InputError(f"--spool {directory}: {e}") from e
    spooled = [s for s in spooled if s.chunks]
    chunks = [c for s in spooled for c in s.chunks]
    if not chunks:
        print(f"{out}: already holds every chunk of {' '.join(args.spool)} (folded before); nothing to do")
        return {}
    t0 = time.perf_counter()
    keys, tokens, offsets = [], [], []
    for part in spooled:
        k, t, o = part.token_store(base.n_next, tokenizer.eos_token_id)
        keys.append(k)
        offsets.append(o + sum(map(len, tokens)))
        tokens.append(t)
    num_keys = sum(map(len, keys))
    build = dict(spool=[str(Path(d).resolve()) for d in args.spool], spool_chunks=chunks)
    append_datastore(out, np.concatenate(keys), np.concatenate(tokens), np.concatenate(offsets), build=build)
    written = Manifest.from_json((out / MANIFEST).read_text())
    summary = dict(
        out=str(out),
        appended_keys=num_keys,
        chunks=len(chunks),
        keys=written.num_keys,
        seconds=time.perf_counter() - t0,
    )
    print(
        f"\ndatastore {out}\n  appended {num_keys:,} served keys from {len(chunks)} spool chunks of "
        f"{', '.join(args.spool)}\n  keys {written.num_keys:,} ({written.index_factory}), {summary['seconds']:.1f} s"
    )
    return summary


def print_summary(s: dict[str, Any]) -> None:
    """The end-of-build report: what went in, what came out, and where the time went."""
    print(f"\ndatastore {s['out']}")
    print(f"  rows {s['rows']:,}: {s['sequences']:,} sequences, {s['tokens']:,} tokens")
    if s["skipped_empty"]:
        print(f"  skipped {s['skipped_empty']:,} rows with an empty response")
    if s["truncated"]:
        print(f"  truncated {s['truncated']:,} sequences to --max-length ({s['truncated_tokens']:,} tokens cut)")
    if s["appended_keys"]:
        print(f"  appended {s['appended_keys']:,} keys")
    print(f"  keys {s['keys']:,} ({s['index']}), {s['bytes'] / 2**20:.1f} MiB, {s['bytes_per_key']:.1f} bytes/key")
    for stage, secs in s["stage_s"].items():
        rate = f"  {s['embed_tokens_per_s']:,.0f} tok/s" if stage == "embed" and s["embed_tokens_per_s"] else ""
        print(f"  {stage:<12} {secs:8.1f} s{rate}")
