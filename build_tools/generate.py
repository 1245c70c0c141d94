"""`dresd-build generate`: the in-domain corpus, the target model's own answers to the prompts.

Every input row comes out with all its fields and the response added under --response-key, in
input order, so the file feeds `dresd-build datastore` directly. Prompts go to vLLM in shards of
--shard-size; a finished shard is appended (and fsynced) as soon as every shard before it is in
the file, and one finished early (on Ray) waits in `OUT.parts/`. A rerun after a kill counts the
complete lines of OUT, drops a torn last line, and continues from there with the parts already
made: no prompt is lost or written twice. `OUT.meta.json` records the settings, and a rerun with
other settings refuses to continue (or starts over with --overwrite).

Sampling is greedy unless --temperature > 0; then every prompt has its own seed (--seed + its row
number), so the text does not depend on sharding, batching or the number of workers.
"""

import itertools
import json
import os
import shutil
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from build_tools.data import InputError, Template, differences, get_text, load_rows
from build_tools.embed import check_length, load_tokenizer, shard_task, task_sequences, unbatch
from build_tools.engine import close_llm, make_llm
from build_tools.ray_jobs import ShardRunner
from dresd_vllm.store.atomic import write_atomic


class GenerateWorker:
    """Answers shards of prompts with one vLLM engine; a callable class for Ray Data's `map_batches`.

    A prompt that leaves no room for a single new token in `max_length` gets an empty response
    (the datastore build skips and counts those) instead of failing the whole shard.
    """

    def __init__(self, model: str, max_length: int, engine_args: dict[str, Any], sampling: dict[str, Any]):
        self.llm = make_llm(model, max_length, engine_args, pooling=False)
        self.max_length = max_length
        self.sampling = sampling

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Map shard tasks to `{"shard", "texts" (a JSON list), "generated" (token count), "seconds"}`."""
        from vllm import SamplingParams

        out: dict[str, list] = {"shard": [], "texts": [], "generated": [], "seconds": []}
        for task in unbatch(batch):
            start = time.perf_counter()
            seqs = task_sequences(task)
            fits = [i for i, s in enumerate(seqs) if len(s) < self.max_length]
            sampling = dict(self.sampling)
            seed = sampling.pop("seed")
            params = [
                SamplingParams(**sampling, seed=seed + int(task["start"]) + i if sampling["temperature"] > 0 else None)
                for i in fits
            ]
            results = self.llm.generate([{"prompt_token_ids": seqs[i]} for i in fits], params, use_tqdm=False)
            texts = [""] * len(seqs)
            for i, r in zip(fits, results, strict=True):
                texts[i] = r.outputs[0].text
            out["shard"].append(int(task["shard"]))
            out["texts"].append(json.dumps(texts))
            out["generated"].append(sum(len(r.outputs[0].token_ids) for r in results))
            out["seconds"].append(time.perf_counter() - start)
        return out

    def close(self) -> None:
        close_llm(self.llm)


def _meta(args: Namespace) -> dict[str, Any]:
    # --limit is left out: rerunning with a larger one extends a finished file.
    keys = ("model", "template", "dataset", "split", "prompt_key", "response_key", "max_tokens", "max_length")
    return {k: getattr(args, k) for k in keys} | dict(
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        # The answers are this model's greedy output at this dtype only: serve at it too.
        dtype=args.engine_args.get("dtype"),
    )


def _complete_lines(path: Path) -> int:
    """Number of complete lines in `path`, after cutting off a torn last line left by a kill."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data.count(b"\n", 0, end)


def resume_point(out: Path, meta: dict[str, Any], prompts: list[str], prompt_key: str, overwrite: bool) -> int:
    """How many rows OUT already holds for this run (0 for a new file); InputError if it is someone else's."""
    meta_file, parts = Path(f"{out}.meta.json"), Path(f"{out}.parts")
    if overwrite or not out.exists():
        out.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
        meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return 0
    if not meta_file.is_file():
        raise InputError(
            f"--out {out}: exists but was not written by `dresd-build generate` (no {meta_file.name}); "
            "pass --overwrite to replace it or choose another --out"
        )
    old = json.loads(meta_file.read_text())
    if old != meta:
        diffs = "; ".join(differences(old, meta))
        raise InputError(
            f"--out {out}: was started with other settings ({diffs}); rerun with the same ones to resume, "
            "or pass --overwrite to start over"
        )
    done = _complete_lines(out)
    if done > len(prompts):
        raise InputError(f"--out {out}: holds {done} rows but the dataset gives {len(prompts)} prompts")
    with open(out, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if get_text(json.loads(line), prompt_key, i) != prompts[i]:
                raise InputError(
                    f"--out {out}: row {i} answers another prompt than row {i} of the dataset; "
                    "pass --overwrite to start over"
                )
    return done


def _ranges(done: int, total: int, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges from `done` to `total`, cut at multiples of `shard_size` (stable across reruns)."""
    edges = [done, *range((done // shard_size + 1) * shard_size, total, shard_size), total]
    return [(a, b) for a, b in itertools.pairwise(edges) if a < b]


def run_generate(args: Namespace) -> dict[str, Any]:
    """The `generate` command; returns its summary."""
    out = Path(args.out)
    check_length(args.model, args.max_length, **args.hf)
    tokenizer = load_tokenizer(args.model, **args.hf)
    template = Template(args.template, tokenizer)
    rows = load_rows(args.dataset, args.split, args.limit)
    prompts = [get_text(row, args.prompt_key, i) for i, row in enumerate(rows)]
    clash = next((i for i, row in enumerate(rows) if args.response_key in row), None)
    if clash is not None:
        raise InputError(
            f"row {clash} already has a field {args.response_key!r}; "
            "pass --response-key NAME to store the generated response under another name"
        )
    done = resume_point(out, _meta(args), prompts, args.prompt_key, args.overwrite)
    if done == len(rows):
        print(f"{out}: complete, {done} rows; nothing to do")
        return dict(out=str(out), rows=done, generated_rows=0)
    parts = Path(f"{out}.parts")
    parts.mkdir(exist_ok=True)

    def part_path(a: int, b: int) -> Path:
        return parts / f"{a:09d}-{b:09d}.jsonl"

    ranges = _ranges(done, len(rows), args.shard_size)
    waiting = {a: b for a, b in ranges if part_path(a, b).is_file()}  # finished by an earlier run
    tasks = []
    for shard, (a, b) in enumerate(ranges):
        if a in waiting:
            continue
        ids = template.encode_prompts(prompts[a:b])
        tokens = np.array([t for s in ids for t in s], dtype=np.int32)
        tasks.append(shard_task(shard, tokens, np.array([len(s) for s in ids]), start=a))
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    runner = ShardRunner(
        GenerateWorker,
        dict(model=args.model, max_length=args.max_length, engine_args=args.engine_args, sampling=sampling),
        use_ray=args.use_ray,
        num_workers=args.ray_workers,
    )
    wall_start, generated, empty = time.perf_counter(), 0, 0
    start_time = None  # when the first shard began on a started engine: rates leave start-up out
    next_row = done
    starting = "generate: starting " + ("Ray workers" if args.use_ray else "engine")
    with (
        open(out, "a", encoding="utf-8") as f,
        tqdm(total=len(rows), initial=done + sum(b - a for a, b in waiting.items()), desc=starting, unit="row") as bar,
    ):

        def flush() -> None:
            # Append every waiting part that is next in line, in order, then forget it.
            nonlocal next_row
            while next_row in waiting:
                path = part_path(next_row, waiting[next_row])
                f.write(path.read_text(encoding="utf-8"))
                f.flush()
                os.fsync(f.fileno())
                path.unlink()
                next_row = waiting.pop(next_row)

        flush()
        try:
            for result in runner.run(tasks):
                a, b = ranges[result["shard"]]
                if start_time is None:
                    start_time = time.perf_counter() - result["seconds"]
                    bar.start_t = time.time() - result["seconds"]  # tqdm's own rate, from the first token
                    bar.set_description("generate")
                texts = json.loads(result["texts"])
                empty += sum(not t.strip() for t in texts)
                lines = "".join(
                    json.dumps({**rows[i], args.response_key: t}, ensure_ascii=False, default=str) + "\n"
                    for i, t in zip(range(a, b), texts, strict=True)
                )
                write_atomic(part_path(a, b), lambda tmp, text=lines: tmp.write_text(text, encoding="utf-8"))
                waiting[a] = b
                flush()
                generated += result["generated"]
                bar.update(b - a)
                bar.set_postfix_str(f"{generated / (time.perf_counter() - start_time):,.0f} tok/s")
        finally:
            runner.close()
    shutil.rmtree(parts)
    end = time.perf_counter()
    secs = end - (start_time or end)
    summary = dict(
        out=str(out),
        rows=len(rows),
        generated_rows=len(rows) - done,
        generated_tokens=generated,
        empty_responses=empty,
        seconds=secs,
        engine_start_s=(start_time or end) - wall_start,
        tokens_per_s=generated / secs if secs else None,
    )
    print(
        f"\n{out}: {len(rows):,} rows ({len(rows) - done:,} generated now), {generated:,} tokens "
        f"in {secs:.1f} s after {summary['engine_start_s']:.1f} s of engine start-up, "
        f"{generated / max(secs, 1e-9):,.0f} tok/s; {empty:,} empty responses"
    )
    return summary
