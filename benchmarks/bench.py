"""`make bench`: the paper's table on SmolLM2 over public data, a chat and a code assistant.

    python -m benchmarks.bench                       # every step (hours on a 2-core machine)
    python -m benchmarks.bench --steps replay        # the stores, then only some of: replay, compare, nucleus,
                                                     # distribution, serve

- **chat**: MT-Bench's 80 first turns, with the chat stores: DReSD-ID over SmolLM2's own greedy answers
  to the first ShareGPT prompts (the shipped `smollm2-chat-id` corpus, `build_tools.embedded.chat_corpus`),
  DReSD-OOD over ShareGPT's own first answers, REST over the ID answers;
- **code**: HumanEval's 164 problems, with the code stores: DReSD-ID over the shipped stdlib ID corpus,
  DReSD-OOD over the stdlib corpus's answers to the same instructions, REST over the ID answers (the same
  commands as `make demo`'s stores: finished ones there are copied, not built again).

Steps, each written under `docs/benchmarks-public/` with the machine, the versions and its command:

1. the datastores of the chosen datasets, under `build/bench/`, first (a finished one is not built again);
2. `replay`: greedy, k=10, 128 tokens, every prompt: ngram (PLD), suffix, REST, pure DReSD-ID/-OOD
   and the full proposer, with the multi-draft bound (`--best-of`): acceptance rate, accepted length
   and tokens per step over all steps, which equal the engine's;
3. `compare`: tok/s of every method (vanilla and draft_model too) on the first prompts of each, rounds
   interleaved, median with its spread;
4. `nucleus`: the paper's sampled setting (temperature 0.7, top-p 0.95) for vanilla, suffix, REST and
   DReSD: acceptance and speed;
5. `distribution`: do DReSD's sampled outputs follow the target's distribution? A permutation test of
   token frequencies over many seeds against plain sampling, pass or fail, beside plain sampling against
   itself (other seeds) and two samplers wrong on purpose (what the test can detect);
6. `serve` (chat setting): vLLM's own `vllm bench serve` on the reserved ShareGPT conversations against a
   plain, a `suffix` and a DReSD server, at concurrency 1 and 4.

`summary.md` joins them: per setting, a greedy and a sampled table and the distribution verdicts.
Tuning never used MT-Bench, HumanEval or the reserved ShareGPT conversations (`sharegpt:eval`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import demo
from dresd_assets import DEFAULT_DATASET, DEFAULT_ID_CORPUS, check_default_model

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
DOCS = ROOT / "docs" / "benchmarks-public"
ENGINE_ARGS = json.dumps({"dtype": "float32"})
STEPS = ("replay", "compare", "nucleus", "distribution", "serve")
CURVE_ROWS = (500, 1000, 2000, 4000, 8000)
K, MAX_TOKENS = 10, 128
# Store sizes: the chat ID rows are the curve's choice (docs/benchmarks-public.md: 500 to 1,000 prompts
# gained 3% tokens per step; each doubling costs twice the build); ShareGPT answers are
# long, so the OOD store cuts its sequences at 512 tokens. The code stores are `make demo`'s, by the same commands
# (its rows and PCA sample: the first 400 rows of the stdlib corpora), so a store one built serves the other.
CHAT_ID_ROWS = 1000
CHAT_OOD_ROWS = 400
CODE_ROWS = demo.STORE_PROMPTS
PCA_SAMPLE = 20_000  # chat: states the projection is fitted on (the build's default, 100k, takes many minutes here)
COMPARE_PROMPTS, REPEATS = 8, 3
NUCLEUS_SETTING = (0.7, 0.95)  # the paper's sampled setting: temperature, top-p
NUCLEUS = ("--temperature", str(NUCLEUS_SETTING[0]), "--top-p", str(NUCLEUS_SETTING[1]))
# vLLM's own serving benchmark on the reserved ShareGPT conversations: requests per concurrency.
SERVE_REQUESTS = {1: 16, 4: 32}
# The distribution check: label permutations per test, and its level (shared out over the prompts).
PERMUTATIONS, ALPHA = 2000, 0.01
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
    chat, code = ("--pca-sample", str(PCA_SAMPLE)), ("--pca-sample", str(demo.PCA_SAMPLE))
    sources: dict[str, dict[str, tuple[str, str, int, tuple[str, ...]]]] = {
        "chat": {"ID": (str(chat_id), "output", chat_id_rows, chat), "OOD": ("sharegpt", "response", CHAT_OOD_ROWS,
                 (*chat, "--max-length", "512"))},
        "code": {"ID": (DEFAULT_ID_CORPUS, "output", CODE_ROWS, code), "OOD": (DEFAULT_DATASET.train, "response",
                 CODE_ROWS, code)},
    }  # fmt: skip
    built = {setting: paths for setting, paths in built.items() if setting in settings}
    work.mkdir(parents=True, exist_ok=True)
    if "code" in built:
        _copy_demo_stores(built["code"])
    jobs = []
    for setting, paths in built.items():
        for name in ("ID", "OOD"):
            dataset, key, rows, extra = sources[setting][name]
            if not (paths[name] / "manifest.json").is_file():
                args = ["build_tools.cli", "datastore", "--dataset", dataset, "--response-key", key, "--limit",
                        str(rows), *extra, "--engine-args", ENGINE_ARGS, "--out", str(paths[name])]  # fmt: skip
                jobs.append((args, paths[name].with_suffix(".log")))
        if not paths["REST"].is_file():
            dataset, key, rows, _ = sources[setting]["ID"]
            args = ["build_tools.cli", "rest", "--dataset", dataset, "--response-key", key, "--prompt-key",
                    "instruction", "--limit", str(rows), "--out", str(paths["REST"])]  # fmt: skip
            jobs.append((args, paths["REST"].with_suffix(".log")))
    # Two at a time: vLLM's CPU engine runs on one core, the machine has two.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: _run(*job), jobs))
    return {s: {n: str(p) for n, p in paths.items()} for s, paths in built.items()}


def _copy_demo_stores(paths: dict[str, Path]) -> None:
    """`make demo`'s finished stores, copied where the code stores are missing: the same commands build both."""
    for name, source in (("ID", "dresd-id"), ("OOD", "dresd-ood"), ("REST", "rest-id.npz")):
        target, found = paths[name], demo.BUILD / source
        done = (found / "manifest.json").is_file() if found.suffix != ".npz" else found.is_file()
        if target.exists() or not done:
            continue
        print(f"{target}: copied from {found} (make demo's, built by the same command)", flush=True)
        partial = target.with_name(target.name + ".copying")
        shutil.rmtree(partial, ignore_errors=True)
        if found.is_dir():
            shutil.copytree(found, partial)
        else:
            shutil.copyfile(found, partial)
        partial.rename(target)  # a half-copied store never looks finished


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


def serve(paths: dict[str, str], work: Path, out: Path, requests: dict[int, int]) -> list[dict[str, Any]]:
    """`vllm bench serve` (through `benchmarks.vllm_bench_serve`) on the reserved ShareGPT conversations against
    a plain, a `suffix` and a DReSD server (the full proposer over the chat ID store), greedy, through the
    chat endpoint (the chat template the stores were built with), at each concurrency of `requests`."""
    from benchmarks.report import write_report
    from benchmarks.server import engine_flags, vllm_server
    from build_tools.public_data import load_named, serve_json

    model = check_default_model()
    # Each level its own conversations, in file order: a speculative server keeps what it served (suffix's
    # global tree, DReSD's online store), so a prompt served again would be drafted from its own answer.
    # Four conversations a request leave room for those `vllm bench serve` drops as too long.
    rows = serve_json(load_named("sharegpt:eval"))
    data: dict[int, Path] = {}
    first = 0
    for concurrency, count in requests.items():
        data[concurrency] = work / f"sharegpt-eval-serve-c{concurrency}.json"
        data[concurrency].write_text(json.dumps(rows[first : first + 4 * count], ensure_ascii=False))
        first += 4 * count
    servers = {
        "vanilla": None,
        "suffix": {"method": "suffix", "num_speculative_tokens": K},
        "dresd-ID+context": {"method": "dresd", "datastore": paths["ID"], "num_speculative_tokens": K},
    }
    flags = engine_flags({"dtype": "float32", "max_model_len": 2048, "enforce_eager": True})
    results = []
    for name, config in servers.items():
        spec = ["--speculative-config", json.dumps(config)] if config else []
        with vllm_server(model, *flags, *spec, log=work / f"serve-{name}.log") as base_url:
            for concurrency, count in requests.items():
                filename = f"vllm-bench-serve-{name}-c{concurrency}.json"
                _run(["benchmarks.vllm_bench_serve", "--base-url", base_url, "--model", model, "--backend",
                      "openai-chat", "--endpoint", "/v1/chat/completions", "--dataset-name", "sharegpt",
                      "--dataset-path", str(data[concurrency]), "--disable-shuffle", "--num-prompts", str(count),
                      "--sharegpt-output-len", str(MAX_TOKENS), "--max-concurrency", str(concurrency),
                      "--temperature", "0", "--seed", "0",
                      "--save-result", "--result-dir", str(work), "--result-filename", filename])  # fmt: skip
                result = json.loads((work / filename).read_text())
                output, accepted = result["total_output_tokens"], result.get("spec_decode_accepted_tokens", 0)
                results.append(dict(
                    server=name, concurrency=concurrency, requests=result["completed"], output_tokens=output,
                    output_tokens_per_s=result["output_throughput"], median_ttft_ms=result["median_ttft_ms"],
                    median_tpot_ms=result["median_tpot_ms"], acceptance_rate=result.get("spec_decode_acceptance_rate"),
                    tokens_per_step=output / max(output - accepted, 1),
                ))  # fmt: skip
    plain = {r["concurrency"]: r["output_tokens_per_s"] for r in results if r["server"] == "vanilla"}
    for r in results:
        r["speedup"] = r["output_tokens_per_s"] / plain[r["concurrency"]]
    write_report(out, "vllm-bench-serve.json", dict(dataset="sharegpt:eval", max_tokens=MAX_TOKENS, results=results))
    (out / "vllm-bench-serve.md").write_text(serve_table(results))
    return results


def serve_table(results: list[dict[str, Any]]) -> str:
    """The `serve` step's results as Markdown, one row per server and concurrency, by concurrency."""
    from benchmarks.report import markdown_table

    headers = ["server", "concurrency", "requests", "output tok/s", "speedup", "tokens/step (est.)", "accept rate",
               "median TTFT ms", "median TPOT ms"]  # fmt: skip
    rows = []
    for r in sorted(results, key=lambda r: r["concurrency"]):
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1f}%"
        rows.append([r["server"], str(r["concurrency"]), str(r["requests"]), f"{r['output_tokens_per_s']:.1f}",
                     f"{r['speedup']:.2f}", f"{r['tokens_per_step']:.2f}", rate, f"{r['median_ttft_ms']:.0f}",
                     f"{r['median_tpot_ms']:.1f}"])  # fmt: skip
    return markdown_table(headers, rows) + "\n"


def permutation_test(a: np.ndarray, b: np.ndarray, permutations: int, seed: int = 0) -> tuple[float, float]:
    """Are the samples `a` and `b` (rows: samples, columns: positions) drawn from one distribution?

    The statistic is the total variation distance between the two sets' token frequencies, averaged over
    positions; its p-value is the share of random splits of the pooled samples (whole samples keep their
    tokens together) at least as far apart, so a sampler that drifts from the target at any position fails.
    Returns (statistic, p-value).
    """
    pooled = np.concatenate([a, b])
    positions = pooled.shape[1]
    # Per position, tokens as dense ids, shifted so that one bincount counts every position at once.
    ids = np.stack([np.unique(pooled[:, q], return_inverse=True)[1] for q in range(positions)], axis=1)
    ids = ids + np.concatenate([[0], np.cumsum(ids.max(axis=0) + 1)[:-1]])
    size = int(ids.max()) + 1

    def statistic(first: np.ndarray) -> float:
        freq_a = np.bincount(ids[first].ravel(), minlength=size) / first.sum()
        freq_b = np.bincount(ids[~first].ravel(), minlength=size) / (~first).sum()
        return float(0.5 * np.abs(freq_a - freq_b).sum() / positions)

    labels = np.arange(len(pooled)) < len(a)
    observed = statistic(labels)
    rng = np.random.default_rng(seed)
    as_far = sum(statistic(rng.permutation(labels)) >= observed for _ in range(permutations))
    return observed, (1 + as_far) / (1 + permutations)


def distribution(
    dataset: str, paths: dict[str, str], out: Path, prompts: int = 2, samples: int = 256, tokens: int = 16
) -> dict[str, Any]:
    """Do DReSD's sampled outputs follow the target's distribution? A permutation test per prompt.

    For each of the first `prompts` prompts of `dataset`, `samples` outputs of `tokens` tokens (temperature 0.7,
    top-p 0.95, one seed each, no seed shared between sets) from plain sampling and from DReSD-ID+context
    (``token_cost`` 0, so that it drafts at every batch size) are compared by `permutation_test`. Rejection
    sampling keeps the target distribution, so DReSD passes when no prompt's p-value is below ALPHA / prompts
    (Bonferroni). Beside it, with the same test: plain
    sampling against itself on other seeds (it should pass), and two samplers that are wrong on purpose,
    temperature 1.0 and no top-p (what the test can detect at this sample size).
    """
    from vllm import LLM, SamplingParams

    from benchmarks.metrics import acceptance, spec_counters
    from benchmarks.report import write_report
    from build_tools.data import Template, load_rows
    from build_tools.engine import close_llm
    from dresd_vllm.store.manifest import MANIFEST, Manifest

    model = check_default_model()
    rows = load_rows(dataset, limit=prompts)
    # No partial prefill: after one, vLLM rewinds the seeded request's generator, which a CPU generator refuses.
    llm_args = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                    disable_log_stats=False, enable_chunked_prefill=False, max_num_seqs=64,
                    max_num_batched_tokens=8192)  # fmt: skip
    # A price of 0 keeps the full proposer drafting at these batches of 64, where its fitted price stands it down.
    dresd = {"method": "dresd", "datastore": paths["ID"], "num_speculative_tokens": K, "token_cost": 0.0}
    store = Manifest.from_json((Path(paths["ID"]) / MANIFEST).read_text())
    # name: (speculative config, first seed, temperature, top_p); every set has seeds of its own.
    sets: dict[str, tuple[dict[str, Any] | None, int, float, float]] = {
        "plain": (None, 0, *NUCLEUS_SETTING),
        "plain, other seeds": (None, samples, *NUCLEUS_SETTING),
        "plain at temperature 1.0 (wrong on purpose)": (None, 3 * samples, 1.0, NUCLEUS_SETTING[1]),
        "plain without top-p (wrong on purpose)": (None, 4 * samples, NUCLEUS_SETTING[0], 1.0),
        "dresd-ID+context": (dresd, 2 * samples, *NUCLEUS_SETTING),
    }
    outputs: dict[str, list[np.ndarray]] = {}
    drafted: dict[str, Any] = {}
    for spec in (None, dresd):
        llm = LLM(**llm_args, speculative_config=spec)
        template = Template(store.template, llm.get_tokenizer())  # as the store embedded its prompts
        encoded = [{"prompt_token_ids": ids} for ids in template.encode_prompts([r["instruction"] for r in rows])]
        before = spec_counters(llm.get_metrics())
        for name, (config, first_seed, temperature, top_p) in sets.items():
            if config is not spec:
                continue
            params = [
                SamplingParams(temperature=temperature, top_p=top_p, max_tokens=tokens, seed=first_seed + s,
                               ignore_eos=True)
                for s in range(samples)
            ]  # fmt: skip
            outputs[name] = [
                np.array([o.outputs[0].token_ids for o in llm.generate([p] * samples, params, use_tqdm=False)])
                for p in encoded
            ]
        if spec is not None:  # the check means something only where drafts were verified and accepted
            drafted = acceptance(before, spec_counters(llm.get_metrics()))
        close_llm(llm)

    per_prompt: list[dict[str, Any]] = []
    for i in range(len(rows)):
        tests = {}
        for name in sets:
            if name != "plain":
                tv, p = permutation_test(outputs["plain"][i], outputs[name][i], PERMUTATIONS)
                tests[name] = dict(mean_tv=tv, p_value=p)
        per_prompt.append(dict(prompt=i, against_plain=tests))
    threshold = ALPHA / len(rows)
    verdicts = {
        name: "pass" if all(p["against_plain"][name]["p_value"] >= threshold for p in per_prompt) else "fail"
        for name in sets
        if name != "plain"
    }
    result: dict[str, Any] = dict(
        dataset=dataset, prompts=len(rows), samples=samples, tokens=tokens, temperature=NUCLEUS_SETTING[0],
        top_p=NUCLEUS_SETTING[1], permutations=PERMUTATIONS, alpha=ALPHA, threshold=threshold,
        dresd_acceptance={k: v for k, v in drafted.items() if k != "acceptance_by_position"},
        verdicts=verdicts, per_prompt=per_prompt,
    )  # fmt: skip
    write_report(out, f"distribution-{dataset}.json", result)
    (out / f"distribution-{dataset}.md").write_text(distribution_table(result))
    return result


def distribution_table(result: dict[str, Any]) -> str:
    """The distribution check as Markdown: per sampler, its mean TV and p-value per prompt, and the verdict."""
    prompts = [f"prompt {p['prompt']}: mean TV (p)" for p in result["per_prompt"]]
    headers = ["against plain sampling", *prompts, "verdict"]
    lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
    for name, verdict in result["verdicts"].items():
        cells = [f"{p['against_plain'][name]['mean_tv']:.3f} ({p['against_plain'][name]['p_value']:.4f})"
                 for p in result["per_prompt"]]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    drafted = result["dresd_acceptance"]
    return "\n".join([
        f"{result['samples']} samples of {result['tokens']} tokens per prompt and sampler, temperature "
        f"{result['temperature']}, top-p {result['top_p']}; permutation test over {result['permutations']} "
        f"splits; fail where a prompt's p < {result['alpha']} / {result['prompts']} = {result['threshold']:.4f}.",
        f"DReSD-ID+context drafted {drafted.get('draft_tokens', 0)} tokens in {drafted.get('drafts', 0)} drafts, "
        f"{drafted.get('accepted_tokens', 0)} accepted.",
        "",
        *lines,
    ]) + "\n"  # fmt: skip


def curve(rows: list[int], chat_id: Path, work: Path, out: Path) -> list[dict[str, Any]]:
    """Tokens per step on MT-Bench against keys in the chat ID store, for ID stores over the first `rows` prompts.

    Pure DReSD-ID, its multi-draft bound, the full proposer and REST over the same answers, by replay;
    every point shares one trajectory cache.
    """
    from dresd_vllm.store.manifest import MANIFEST, Manifest

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


def _report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _table(replayed: dict[str, dict[str, Any]], compared: dict[str, dict[str, Any]]) -> list[str]:
    """One setting's rows: replay's figures where there are some (else compare's), compare's speed."""
    headers = ["method", "tokens/step", "accept rate", "accept len", "best-of bound", "tok/s (spread)", "speedup"]
    lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
    for name in dict.fromkeys([*compared, *replayed]):
        if name.endswith("best-of-survivors"):
            continue
        r, c = replayed.get(name, {}), compared.get(name, {})
        if name == "vanilla":
            r = {"tokens_per_step": 1.0}
        spread = c.get("spread", {}).get("tokens_per_s") if c.get("repeats") != 1 else None  # one round: no spread
        speed = _cell(c.get("tokens_per_s"), ".1f") + (f" ({spread[0]:.1f}-{spread[1]:.1f})" if spread else "")
        cells = [
            name,
            _cell(r.get("tokens_per_step", c.get("tokens_per_step"))),
            _cell(r.get("acceptance_rate", c.get("acceptance_rate")), ".1%"),
            _cell(r.get("mean_acceptance_length", c.get("mean_acceptance_length"))),
            _cell(replayed.get(f"{name} best-of-survivors", {}).get("tokens_per_step")),
            speed if c else "-",
            _cell(c.get("speedup"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(out: Path) -> str:
    """The reports found in `out` as one page: per setting, the greedy table (replay and compare) and the
    sampled one (nucleus), then the distribution check."""
    lines = [f"# make bench: SmolLM2-135M-Instruct, k={K}, {MAX_TOKENS} tokens", ""]
    notes = []
    for dataset, (setting, prompts) in SETTINGS.items():
        replayed = _methods(out / f"replay-{dataset}.json")
        for step, title in (("compare", "greedy"), ("nucleus", "temperature {}, top-p {}".format(*NUCLEUS_SETTING))):
            report = _report(out / f"{step}-{dataset}" / "compare.json")
            compared = {m["name"]: m for m in report.get("methods", [])}
            if not compared and (step == "nucleus" or not replayed):
                continue
            timed = report.get("prompts", {}).get("prompts")
            lines += [f"## {dataset}, {title} ({setting} stores)", ""]
            if step == "compare" and replayed:
                notes.append(f"{dataset}, greedy: tokens/step, accept rate, accept len and best-of bound by replay "
                             f"over all {prompts} prompts (draft_model: compare's engine counters)")  # fmt: skip
            if timed:
                rounds = max((m.get("repeats", 1) for m in compared.values()), default=1)
                notes.append(f"{dataset}, {title}: tok/s and speedup by `dresd-bench compare` on the first {timed} "
                             f"prompts, median of {rounds} interleaved round(s) (min-max)"
                             + ("; every figure of this table from it" if step == "nucleus" else ""))  # fmt: skip
            lines += [*_table(replayed if step == "compare" else {}, compared), ""]
        if (out / f"distribution-{dataset}.md").is_file():
            lines += [f"## {dataset}: do sampled outputs follow the target's distribution?", "",
                      (out / f"distribution-{dataset}.md").read_text()]  # fmt: skip
    if (out / "vllm-bench-serve.md").is_file():
        lines += ["## sharegpt (held out): `vllm bench serve` against each server (chat stores)", "",
                  (out / "vllm-bench-serve.md").read_text()]  # fmt: skip
        notes.append("sharegpt: one run of `vllm bench serve` per server and concurrency, greedy; tokens/step "
                     "estimated from the server's counters, output / (output - accepted)")  # fmt: skip
    lines += [*(f"- {note}" for note in notes), "- tok/s depend on the machine's load: docs/benchmarks-public.md "
              "says which were taken on a quiet machine"]  # fmt: skip
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
    needed = {SETTINGS[d][0] for d in datasets}
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
            distribution(dataset, setting, args.out)
            print((args.out / f"distribution-{dataset}.md").read_text())
        if "serve" in steps and SETTINGS[dataset][0] == "chat":  # ShareGPT traffic, the chat stores
            serve(setting, args.work, args.out, SERVE_REQUESTS)
            print((args.out / "vllm-bench-serve.md").read_text())
    print(summary(args.out))
    print(f"make bench: {time.perf_counter() - start:.0f} s; reports in {args.out}")


if __name__ == "__main__":
    main()
