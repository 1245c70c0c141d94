"""`make bench`: the paper's table on SmolLM2 over public data, a chat and a code assistant.

    python -m benchmarks.bench                       # every step (about two hours on a quiet 2-core machine)
    python -m benchmarks.bench --steps replay        # the stores, then only some of: replay, compare, nucleus,
                                                     # distribution

- **chat**: MT-Bench's 80 first turns, with the chat stores: DReSD-ID over SmolLM2's own greedy answers
  to the first ShareGPT prompts (the shipped `smollm2-chat-id` corpus, `build_tools.embedded.chat_corpus`),
  DReSD-OOD over ShareGPT's own first answers, REST over the ID answers;
- **code**: HumanEval's 164 problems, with the code stores: DReSD-ID over the shipped stdlib ID corpus,
  DReSD-OOD over the stdlib corpus's answers to the same instructions, REST over the ID answers.

Steps, each written under `docs/benchmarks-public/` with the machine, the versions and its command:

1. the datastores, under `build/bench/`, always first (a finished one is not built again);
2. `replay`: greedy, k=10, 128 tokens, every prompt: ngram (PLD), suffix, REST, pure DReSD-ID/-OOD
   and the full proposer, with the multi-draft bound (`--best-of`): acceptance rate, accepted length
   and tokens per step over all steps, which equal the engine's;
3. `compare`: tok/s of every method (vanilla and draft_model too) on the first prompts of each, rounds
   interleaved, median with its spread;
4. `nucleus`: the paper's sampled setting (temperature 0.7, top-p 0.95) for vanilla, suffix, REST and
   DReSD: acceptance and speed;
5. `distribution`: sampled outputs follow the target's distribution: token frequencies over many seeds
   of DReSD against plain sampling, beside plain sampling against itself (other seeds).

`summary.md` joins them into one table per setting. Tuning never used MT-Bench, HumanEval or the
reserved ShareGPT conversations (`sharegpt:eval`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dresd_assets import DEFAULT_DATASET, DEFAULT_ID_CORPUS, check_default_model

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
DOCS = ROOT / "docs" / "benchmarks-public"
ENGINE_ARGS = json.dumps({"dtype": "float32"})
STEPS = ("replay", "compare", "nucleus", "distribution")
CURVE_ROWS = (500, 1000, 2000, 4000, 8000)
K, MAX_TOKENS = 10, 128
# Store sizes: the chat ID rows are the curve's choice (docs/benchmarks-public.md: 500 to 1,000 prompts
# gained 3% tokens per step; each doubling costs twice the build); ShareGPT answers are
# long, so the OOD store cuts its sequences at 512 tokens; the code stores take the first 400 rows of the
# shipped stdlib ID corpus (600 moved DReSD's tokens per step by 2-3% in `make demo`, for half again the build).
CHAT_ID_ROWS = 1000
CHAT_OOD_ROWS = 400
CODE_ROWS = 400
PCA_SAMPLE = 20_000  # states the projection is fitted on (the build's default, 100k, takes many minutes here)
COMPARE_PROMPTS, REPEATS = 16, 3
NUCLEUS = ("--temperature", "0.7", "--top-p", "0.95")
SETTINGS = {"mt-bench": ("chat", 80), "humaneval": ("code", 164)}


def _run(args: list[str], log: Path | None = None) -> None:
    print(f"$ {' '.join(args)}", flush=True)
    command = [sys.executable, "-m", *args]
    if log is None:
        done = subprocess.run(command, cwd=ROOT)
    else:
        with open(log, "w") as f:
            done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode not in (0, 1):  # 1: a method failed; its report says which, and the rest goes on
        sys.exit(f"make bench: failed (exit {done.returncode}): {' '.join(args)}" + (f"; log: {log}" if log else ""))


def _chat_id(work: Path) -> Path:
    """The shipped chat ID corpus as `dresd-build generate` wrote it, restored under `work` once."""
    chat_id = work / "chat-id.jsonl"
    if not chat_id.is_file():
        from build_tools.embedded.chat_corpus import ASSET, restore

        print(f"{chat_id}: {restore(chat_id, ASSET)} rows from {ASSET.name}", flush=True)
    return chat_id


def stores(work: Path, chat_id_rows: int, settings: set[str]) -> dict[str, dict[str, str]]:
    """The datastores of `settings` (chat, code), built where missing: {setting: {ID, OOD, REST}}."""
    chat_id = _chat_id(work) if "chat" in settings else work / "chat-id.jsonl"
    built = {
        "chat": {
            "ID": work / f"chat-dresd-id-{chat_id_rows}",
            "OOD": work / f"chat-dresd-ood-{CHAT_OOD_ROWS}",
            "REST": work / f"chat-rest-id-{chat_id_rows}.npz",
        },
        "code": {
            "ID": work / f"code-dresd-id-{CODE_ROWS}",
            "OOD": work / f"code-dresd-ood-{CODE_ROWS}",
            "REST": work / f"code-rest-id-{CODE_ROWS}.npz",
        },
    }
    common = ("--pca-sample", str(PCA_SAMPLE), "--engine-args", ENGINE_ARGS)
    sources = {
        "chat": {"ID": (str(chat_id), "output", chat_id_rows, ()), "OOD": ("sharegpt", "response", CHAT_OOD_ROWS,
                 ("--max-length", "512"))},
        "code": {"ID": (DEFAULT_ID_CORPUS, "output", CODE_ROWS, ()), "OOD": (DEFAULT_DATASET.train, "response",
                 CODE_ROWS, ())},
    }  # fmt: skip
    built = {setting: paths for setting, paths in built.items() if setting in settings}
    jobs = []
    for setting, paths in built.items():
        for name in ("ID", "OOD"):
            dataset, key, rows, extra = sources[setting][name]
            if not (paths[name] / "manifest.json").is_file():
                args = ["build_tools.cli", "datastore", "--dataset", dataset, "--response-key", key, "--limit",
                        str(rows), *extra, *common, "--out", str(paths[name])]  # fmt: skip
                jobs.append((args, paths[name].with_suffix(".log")))
        if not paths["REST"].is_file():
            dataset, key, rows, _ = sources[setting]["ID"]
            args = ["build_tools.cli", "rest", "--dataset", dataset, "--response-key", key, "--prompt-key",
                    "instruction", "--limit", str(rows), "--out", str(paths["REST"])]  # fmt: skip
            jobs.append((args, paths["REST"].with_suffix(".log")))
    work.mkdir(parents=True, exist_ok=True)
    # Two at a time: vLLM's CPU engine runs on one core, the machine has two.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: _run(*job), jobs))
    return {s: {n: str(p) for n, p in paths.items()} for s, paths in built.items()}


def _method_args(paths: dict[str, str]) -> list[str]:
    return ["--datastore", f"ID={paths['ID']}", "--datastore", f"OOD={paths['OOD']}", "--rest-datastore", paths["REST"]]


def _replay(dataset: str, method_args: list[str], run_dir: Path) -> None:
    _, limit = SETTINGS[dataset]
    _run(["benchmarks.cli", "replay", "--dataset", dataset, "--limit", str(limit), "--methods",
          "ngram,suffix,rest,dresd", *method_args, "--best-of", "-k", str(K), "--max-tokens", str(MAX_TOKENS),
          "--engine-args", ENGINE_ARGS, "--out", str(run_dir)])  # fmt: skip


def replay(dataset: str, paths: dict[str, str], work: Path, out: Path) -> None:
    """Every proposer on every prompt's greedy trajectory, with the multi-draft bound."""
    run_dir = work / f"replay-{dataset}"  # its trajectory cache stays out of docs/
    _replay(dataset, _method_args(paths), run_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "replay.json", out / f"replay-{dataset}.json")
    shutil.copy(run_dir / "table.md", out / f"replay-{dataset}.md")


def compare(dataset: str, paths: dict[str, str], out: Path, prompts: int, repeats: int, nucleus: bool) -> None:
    """tok/s (median, spread over interleaved rounds) on the first `prompts` prompts; `nucleus`: sampled."""
    methods = "vanilla,suffix,rest,dresd" if nucleus else "vanilla,ngram,suffix,draft_model,rest,dresd"
    _run(["benchmarks.cli", "compare", "--dataset", dataset, "--limit", str(prompts), "--methods", methods,
          *_method_args(paths), "-k", str(K), "--max-tokens", str(MAX_TOKENS), "--repeats", str(repeats),
          "--engine-args", ENGINE_ARGS, *(NUCLEUS if nucleus else ()),
          "--out", str(out / f"{'nucleus' if nucleus else 'compare'}-{dataset}")])  # fmt: skip


def distribution(paths: dict[str, str], out: Path, samples: int = 256, tokens: int = 16) -> dict[str, Any]:
    """Token frequencies of sampled outputs, over `samples` seeds per prompt: DReSD's against plain sampling's.

    For each generated position, the total variation distance between the two methods' token frequencies;
    the same distance between plain sampling and itself on other seeds is the noise floor. Rejection
    sampling keeps the target distribution, so DReSD's distance should sit at the floor.
    """
    from vllm import LLM, SamplingParams

    from benchmarks.report import write_report
    from build_tools.data import Template, load_rows
    from build_tools.engine import close_llm

    model = check_default_model()
    rows = load_rows("mt-bench", limit=2)
    llm_args = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    runs: dict[str, list[list[list[int]]]] = {}
    dresd = {"method": "dresd", "datastore": paths["ID"], "num_speculative_tokens": K}
    for name, spec, first_seed in (("plain", None, 0), ("plain, other seeds", None, samples), ("dresd-ID", dresd, 0)):
        llm = LLM(**llm_args, speculative_config=spec)
        template = Template("chat", llm.get_tokenizer())
        prompts = [{"prompt_token_ids": ids} for ids in template.encode_prompts([r["instruction"] for r in rows])]
        outs = []
        for p in prompts:
            params = [
                SamplingParams(temperature=0.7, top_p=0.95, max_tokens=tokens, seed=first_seed + s, ignore_eos=True)
                for s in range(samples)
            ]
            outs.append([list(o.outputs[0].token_ids) for o in llm.generate([p] * samples, params, use_tqdm=False)])
        runs[name] = outs
        close_llm(llm)

    def tv(a: list[list[int]], b: list[list[int]], pos: int) -> float:
        ca, cb = Counter(s[pos] for s in a), Counter(s[pos] for s in b)
        return 0.5 * sum(abs(ca[t] / len(a) - cb[t] / len(b)) for t in ca.keys() | cb.keys())

    result: dict[str, Any] = dict(samples=samples, tokens=tokens, temperature=0.7, top_p=0.95, prompts=[])
    for i, row in enumerate(rows):
        floor = [tv(runs["plain"][i], runs["plain, other seeds"][i], q) for q in range(tokens)]
        dresd_tv = [tv(runs["plain"][i], runs["dresd-ID"][i], q) for q in range(tokens)]
        result["prompts"].append(
            dict(
                question_id=row["question_id"],
                tv_plain_vs_plain=floor,
                tv_plain_vs_dresd=dresd_tv,
                mean_floor=sum(floor) / tokens,
                mean_dresd=sum(dresd_tv) / tokens,
            )
        )
    write_report(out, "distribution.json", result)
    return result


def curve(rows: list[int], chat_id: Path, work: Path, out: Path) -> list[dict[str, Any]]:
    """Tokens per step on MT-Bench against keys in the chat ID store, for ID stores over the first `rows` prompts.

    Pure DReSD-ID, its multi-draft bound, the full proposer and REST over the same answers, by replay;
    every point shares one trajectory cache.
    """
    from dresd_vllm.manifest import MANIFEST, Manifest

    complete = chat_id.read_bytes().count(b"\n")
    run_dir = work / "replay-mt-bench"
    # Points measured before (another run, a smaller corpus then) stay, unless measured again now.
    done = json.loads((out / "curve.json").read_text())["points"] if (out / "curve.json").is_file() else []
    points = [p for p in done if p["rows"] not in rows]
    for n in rows:
        if n > complete:
            print(f"curve: {chat_id} has {complete} rows, fewer than {n}; stopping there", flush=True)
            break
        ds, rest = work / f"chat-dresd-id-{n}", work / f"chat-rest-id-{n}.npz"
        common = ["--dataset", str(chat_id), "--response-key", "output", "--limit", str(n)]
        jobs = []
        if not (ds / MANIFEST).is_file():
            args = ["build_tools.cli", "datastore", *common, "--pca-sample", str(PCA_SAMPLE), "--engine-args",
                    ENGINE_ARGS, "--out", str(ds)]  # fmt: skip
            jobs.append((args, ds.with_suffix(".log")))
        if not rest.is_file():
            jobs.append((["build_tools.cli", "rest", *common, "--prompt-key", "instruction", "--out", str(rest)],
                         rest.with_suffix(".log")))  # fmt: skip
        for job in jobs:
            _run(*job)
        _replay("mt-bench", ["--datastore", f"ID={ds}", "--rest-datastore", str(rest)], run_dir)
        found = _methods(run_dir / "replay.json")
        keys = Manifest.from_json((ds / MANIFEST).read_text()).num_keys
        point = dict(rows=n, keys=keys, **{name: m["tokens_per_step"] for name, m in found.items()})
        point["pure / REST"] = point["dresd-ID"] / point["rest"]
        points.append(point)
        print(json.dumps(point), flush=True)
    if points:
        from benchmarks.report import write_report

        points.sort(key=lambda p: p["rows"])
        write_report(out, "curve.json", dict(dataset="mt-bench", prompts=80, points=points))
        names = ["rest", "dresd-ID", "dresd-ID best-of-survivors", "dresd-ID+context", "suffix", "ngram", "pure / REST"]
        lines = ["| prompts | keys | " + " | ".join(names) + " |", "|---:" * (len(names) + 2) + "|"]
        lines += [
            f"| {p['rows']} | {p['keys']:,} | " + " | ".join(_cell(p.get(n)) for n in names) + " |" for p in points
        ]
        (out / "curve.md").write_text("\n".join(lines) + "\n")
    return points


def _methods(path: Path) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in json.loads(path.read_text())["methods"]} if path.is_file() else {}


def _cell(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary(out: Path) -> str:
    """The paper's table per setting, from the replay and compare reports found in `out`."""
    lines = [f"# make bench: SmolLM2-135M-Instruct, greedy, k={K}, {MAX_TOKENS} tokens", ""]
    headers = ["method", "tokens/step", "accept rate", "accept len", "best-of bound", "tok/s (spread)", "speedup"]
    for dataset, (setting, prompts) in SETTINGS.items():
        replayed, compared = _methods(out / f"replay-{dataset}.json"), _methods(out / f"compare-{dataset}/compare.json")
        if not replayed and not compared:
            continue
        lines += [f"## {dataset} ({prompts} prompts, {setting} stores)", ""]
        lines += ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
        for name in dict.fromkeys([*compared, *replayed]):
            r, c = replayed.get(name, {}), compared.get(name, {})
            if name == "vanilla":
                r = {"tokens_per_step": 1.0}
            bound = replayed.get(f"{name} best-of-survivors", {}).get("tokens_per_step")
            if name.endswith("best-of-survivors"):
                continue
            spread = c.get("spread", {}).get("tokens_per_s")
            speed = _cell(c.get("tokens_per_s"), ".1f") + (f" ({spread[0]:.1f}-{spread[1]:.1f})" if spread else "")
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        _cell(r.get("tokens_per_step", c.get("tokens_per_step"))),
                        _cell(r.get("acceptance_rate", c.get("acceptance_rate")), ".1%"),
                        _cell(r.get("mean_acceptance_length", c.get("mean_acceptance_length"))),
                        _cell(bound),
                        speed if c else "-",
                        _cell(c.get("speedup"), ".2f"),
                    ]
                )
                + " |"
            )
        lines.append("")
    lines += [
        "tokens/step, accept rate and accept len: replay over every prompt (draft_model: compare's engine counters);",
        f"tok/s: `dresd-bench compare` on the first {COMPARE_PROMPTS} prompts, median of interleaved rounds (min-max).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {','.join(STEPS)}")
    parser.add_argument("--datasets", default=",".join(SETTINGS), help="comma-separated, of mt-bench,humaneval")
    parser.add_argument("--chat-id-rows", type=int, default=CHAT_ID_ROWS, help="ShareGPT prompts of the chat ID store")
    parser.add_argument("--compare-prompts", type=int, default=COMPARE_PROMPTS, help="prompts of compare and nucleus")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved rounds of compare")
    parser.add_argument("--work", type=Path, default=BUILD, help="where the stores are built (default: build/bench)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the reports go (default: docs/benchmarks-public)")
    parser.add_argument(
        "--curve",
        type=lambda text: [int(v) for v in text.split(",")],
        help="instead of the table: the curve, chat ID stores over the first N ShareGPT prompts of --chat-id, "
        f"e.g. {','.join(map(str, CURVE_ROWS))} (as far as the corpus goes)",
    )
    parser.add_argument("--chat-id", type=Path, help="the chat ID corpus (default: the shipped snapshot)")
    args = parser.parse_args(argv)
    if args.curve:
        chat_id = args.chat_id or _chat_id(args.work)
        curve(args.curve, chat_id, args.work, args.out)
        return
    steps, datasets = args.steps.split(","), args.datasets.split(",")
    unknown = sorted(set(steps) - set(STEPS)) + sorted(set(datasets) - set(SETTINGS))
    if unknown:
        sys.exit(f"make bench: unknown steps or datasets {unknown}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines start in seconds
    check_default_model()
    start = time.perf_counter()
    needed = {SETTINGS[d][0] for d in datasets} | ({"chat"} if "distribution" in steps else set())
    paths = stores(args.work, args.chat_id_rows, needed)  # a finished store is not built again
    for dataset in datasets:
        setting = paths[SETTINGS[dataset][0]]
        if "replay" in steps:
            replay(dataset, setting, args.work, args.out)
        if "compare" in steps:
            compare(dataset, setting, args.out, args.compare_prompts, args.repeats, nucleus=False)
        if "nucleus" in steps:
            compare(dataset, setting, args.out, args.compare_prompts, 1, nucleus=True)
    if "distribution" in steps:
        print(json.dumps(distribution(paths["chat"], args.out), indent=2))
    print(summary(args.out))
    print(f"make bench: {time.perf_counter() - start:.0f} s; reports in {args.out}")


if __name__ == "__main__":
    main()
