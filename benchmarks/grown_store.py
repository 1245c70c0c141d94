"""`python -m benchmarks.grown_store`: does a chat ID store grown from served traffic pay? (issue 23)

1. serve: a DReSD server (the full proposer over `build/bench/chat-dresd-id-500`, SmolLM2's greedy
   answers to the first 500 ShareGPT prompts; `online_store_path` a fresh spool) answers the next
   ShareGPT tuning prompts, which that store does not hold: greedy, 128 tokens, fp32, k=10, 8 at a time.
   Prompts of 1,024 tokens or more are left out, as `dresd-build generate --max-length 1024` leaves them
   unanswered;
2. fold: `dresd-build datastore --append --spool` folds the spool into a copy of the 500-prompt store
   (no model runs: the spool holds the projected states and the tokens they produced);
3. replay: MT-Bench's 80 first turns as `benchmarks.bench` replays them (k=10, 128 tokens, greedy, fp32),
   pure DReSD-ID and the full proposer, over the 500-prompt store, the grown one, and
   `chat-dresd-id-1000` (the 500-prompt store with `generate`'s answers to prompts 500-999 appended:
   what an operator builds offline from the same prompts);
4. report: `docs/benchmarks-public/grown-store.{json,md}`.

    python -m benchmarks.grown_store                  # 500 prompts served (~half an hour on 2 quiet cores)
    python -m benchmarks.grown_store --prompts 200    # a shorter run

Needs the two stores (`python -m benchmarks.bench --curve 500,1000` builds them). A finished step is
not run again (its output stays under `build/bench/grown/`); delete that directory to start over.
"""

import argparse
import asyncio
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench import BUILD, DOCS, ENGINE_ARGS, MAX_TOKENS, ROOT, K
from dresd_assets import check_default_model
from dresd_vllm.store.atomic import write_atomic

STORE_ROWS = 500  # ShareGPT prompts the base store answers; the served ones come after them
MAX_LENGTH = 1024  # generate's --max-length: a longer prompt gets no answer in the chat ID corpus
STORES = {"500": BUILD / f"chat-dresd-id-{STORE_ROWS}", "1000": BUILD / "chat-dresd-id-1000"}
GROWN = f"chat-dresd-id-{STORE_ROWS}-grown"  # under the work directory
REPLAYED = ("tokens_per_step", "acceptance_rate", "mean_acceptance_length", "drafted_step_share", "steps")


def _run(args: list[str], log: Path) -> float:
    """`python -m ARGS` with its output in `log`; the seconds it took (exits on failure)."""
    print(f"$ {' '.join(args)}  > {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"grown_store: failed (exit {done.returncode}): {' '.join(args)}; log: {log}")
    return time.perf_counter() - start


def _once(record: Path, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`step`'s result, recorded in `record` when it finishes: a rerun goes on from the first unfinished step."""
    if not record.is_file():
        result = step()
        write_atomic(record, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return json.loads(record.read_text())


def serve(work: Path, prompts: int, concurrency: int) -> dict[str, Any]:
    """Serve ShareGPT prompts STORE_ROWS.. through a spooling DReSD server; what was served, and how fast."""
    from benchmarks.inputs import WARMUP_PROMPT, Prompts, Settings, engine_environment, engine_kwargs
    from benchmarks.serve import run_level
    from benchmarks.server import engine_flags, vllm_server
    from build_tools.data import Template, load_rows
    from build_tools.embed import load_tokenizer
    from dresd_vllm.online.spool_writer import FLUSH_S

    model = check_default_model()
    tokenizer = load_tokenizer(model)
    template = Template("chat", tokenizer)
    rows = load_rows("sharegpt", limit=prompts, skip=STORE_ROWS)
    encoded = template.encode_prompts([r["instruction"] for r in rows])
    kept = [i for i, ids in enumerate(encoded) if len(ids) < MAX_LENGTH]
    (warmup,) = template.encode_prompts([WARMUP_PROMPT])
    batch = Prompts([encoded[i] for i in kept], warmup, dict(dataset="sharegpt", skip=STORE_ROWS, prompts=len(kept)))
    longest = max(map(len, [*batch.token_ids, warmup]))
    settings = Settings(
        model=model, num_speculative_tokens=K, max_tokens=MAX_TOKENS, batch_size=concurrency, seed=0,
        temperature=0.0, top_p=1.0, max_model_len=longest + MAX_TOKENS + 2 * K + 1, engine_args=json.loads(ENGINE_ARGS),
    )  # fmt: skip
    spool = work / "spool"
    # A fresh spool holds only this run's answers; the grown store (and its record) was made of the last one.
    shutil.rmtree(spool, ignore_errors=True)
    shutil.rmtree(work / GROWN, ignore_errors=True)
    (work / "fold.json").unlink(missing_ok=True)
    config = {"method": "dresd", "datastore": str(STORES["500"]), "num_speculative_tokens": K,
              "online_store_path": str(spool)}  # fmt: skip
    flags = engine_flags(engine_kwargs(settings, max_num_seqs=concurrency))
    flags += ["--speculative-config", json.dumps(config)]
    engine_environment(offline=False)
    start = time.perf_counter()
    with vllm_server(model, *flags, log=work / "server.log", startup_timeout=900) as base_url:
        started = time.perf_counter() - start
        level = asyncio.run(run_level(base_url, settings, batch, concurrency, len(kept)))
        time.sleep(FLUSH_S + 2)  # the spool writes a partial chunk after FLUSH_S; vLLM's stop kills the worker
    # The served answers against generate's (the chat ID corpus, row i = ShareGPT prompt i), where it has them.
    corpus = BUILD / "chat-id.jsonl"
    generated = [json.loads(line)["output"] for line in corpus.open()] if corpus.is_file() else []
    pairs = [(STORE_ROWS + i, out) for i, out in zip(kept, level.pop("outputs"), strict=True)]
    decode = tokenizer.decode
    compared = [decode(out, skip_special_tokens=True) == generated[r] for r, out in pairs if r < len(generated)]
    return dict(
        prompts=dict(first=STORE_ROWS, rows=len(rows), served=len(kept), skipped_long=len(rows) - len(kept)),
        speculative_config=config,
        server_start_s=started,
        same_text_as_generate=dict(compared=len(compared), equal=sum(compared)),
        **level,
    )


def fold(work: Path) -> dict[str, Any]:
    """A copy of the 500-prompt store with the spool folded in (`--append --spool`)."""
    from dresd_vllm.store.manifest import MANIFEST

    grown = work / GROWN
    if not (grown / MANIFEST).is_file():
        partial = grown.with_name(grown.name + ".copy")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(STORES["500"], partial)
        partial.rename(grown)
    seconds = _run(["build_tools.cli", "datastore", "--out", str(grown), "--append", "--spool", str(work / "spool")],
                   work / "fold.log")  # fmt: skip
    return dict(path=str(grown), seconds=seconds)


def replay(work: Path, stores: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """MT-Bench's first turns replayed over every store: pure DReSD-ID and the full proposer of each."""
    run_dir = work / "replay"
    run_dir.mkdir(parents=True, exist_ok=True)
    shared = BUILD / "replay-mt-bench" / "cache"  # benchmarks.bench's trajectories: same model, prompts, k, tokens
    if shared.is_dir() and not (run_dir / "cache").exists():
        (run_dir / "cache").symlink_to(shared.resolve())
    datastores = [a for name, path in stores.items() for a in ("--datastore", f"{name}={path}")]
    _run(["benchmarks.cli", "replay", "--dataset", "mt-bench", "--limit", "80", "--methods", "dresd", *datastores,
          "-k", str(K), "--max-tokens", str(MAX_TOKENS), "--engine-args", ENGINE_ARGS, "--out", str(run_dir)],
         work / "replay.log")  # fmt: skip
    return {m["name"]: m for m in json.loads((run_dir / "replay.json").read_text())["methods"]}


def report(out: Path, served: dict[str, Any], folded: dict[str, Any], replayed: dict[str, dict[str, Any]],
           stores: dict[str, Path], argv: list[str]) -> str:  # fmt: skip
    """grown-store.json (everything) and grown-store.md (the table); returns the table."""
    from benchmarks.report import machine, versions
    from dresd_vllm.store.manifest import MANIFEST, Manifest

    keys = {name: Manifest.from_json((path / MANIFEST).read_text()).num_keys for name, path in stores.items()}
    first, last = STORE_ROWS, STORE_ROWS + served["prompts"]["rows"] - 1
    label = {
        "500": f"{STORE_ROWS} prompts (generate + embed)",
        "grown": f"{STORE_ROWS} prompts + the spool of serving prompts {first}-{last}",
        "1000": "1,000 prompts (generate + embed)",
    }
    body: dict[str, Any] = dict(
        command=" ".join(["python -m benchmarks.grown_store", *argv]),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine(),
        versions=versions(),
        load_average=os.getloadavg(),  # the machine may be shared: tokens per step do not depend on it, tok/s do
        settings=dict(k=K, max_tokens=MAX_TOKENS, temperature=0.0, engine_args=json.loads(ENGINE_ARGS)),
        stores={name: dict(path=str(path), keys=keys[name]) for name, path in stores.items()},
        served=served,
        folded=folded,
        replay={name: {field: m[field] for field in REPLAYED} for name, m in replayed.items()},
    )
    v = body["versions"]
    lines = [
        f"# A chat ID store grown from served traffic: MT-Bench's 80 first turns (replay, greedy, k={K}, "
        f"{MAX_TOKENS} tokens, fp32)",
        "",
        f"`{body['command']}`, {body['created']}; {body['machine']['cpu']}, {body['machine']['cores']} cores, "
        f"vllm {v.get('vllm (module)')}, torch {v.get('torch (module)')}, faiss {v.get('faiss (module)')}, "
        f"commit {v.get('dresd-vllm commit')}; load average at the end {body['load_average'][0]:.1f}.",
        "",
        "| store | keys | pure DReSD-ID tokens/step | full proposer tokens/step | pure accept rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in stores:
        pure, full = replayed[f"dresd-{name}"], replayed[f"dresd-{name}+context"]
        lines.append(f"| {label[name]} | {keys[name]:,} | {pure['tokens_per_step']:.3f} | "
                     f"{full['tokens_per_step']:.3f} | {pure['acceptance_rate']:.1%} |")  # fmt: skip
    same = served["same_text_as_generate"]
    lines += [
        "",
        f"Served: {served['prompts']['served']} ShareGPT prompts ({first}-{last}, {served['prompts']['skipped_long']} "
        f"of {MAX_LENGTH}+ tokens left out), {served['output_tokens']:,} tokens in {served['elapsed_s']:.0f} s at "
        f"concurrency {served['concurrency']} ({served['output_tokens_per_s']:.1f} tok/s, "
        f"{served['tokens_per_step']:.2f} tokens/step served; server start {served['server_start_s']:.0f} s); "
        f"{same['equal']} of {same['compared']} answers the same text as generate's. "
        f"Folded: {keys['grown'] - keys['500']:,} keys, `dresd-build` start-up included {folded['seconds']:.0f} s.",
    ]
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "grown-store.json").write_text(json.dumps(body, indent=2) + "\n")
    (out / "grown-store.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=500, help="ShareGPT rows served, from row 500 (default: 500)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    parser.add_argument("--skip-generated", action="store_true", help="do not replay chat-dresd-id-1000")
    parser.add_argument("--work", type=Path, default=BUILD / "grown", help="spool, grown store, logs")
    parser.add_argument("--out", type=Path, default=DOCS, help="report directory (default: docs/benchmarks-public)")
    args = parser.parse_args(argv)
    missing = [str(p) for name, p in STORES.items() if not p.is_dir() and not (name == "1000" and args.skip_generated)]
    if missing:
        sys.exit(f"grown_store: missing {missing}; build them with `python -m benchmarks.bench --curve 500,1000`")
    args.work.mkdir(parents=True, exist_ok=True)
    served = _once(args.work / "serve.json", lambda: serve(args.work, args.prompts, args.concurrency))
    folded = _once(args.work / "fold.json", lambda: fold(args.work))
    stores = {"500": STORES["500"], "grown": Path(folded["path"])}
    if not args.skip_generated:
        stores["1000"] = STORES["1000"]
    print(report(args.out, served, folded, replay(args.work, stores), stores, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
