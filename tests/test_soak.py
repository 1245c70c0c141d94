"""Bounded soaks of the OpenAI server with DReSD.

A realistic mix: 16 concurrent `openai` clients, completions and chat, streaming and not, greedy and
sampled, n=2, stop strings, logprobs, prompts over max-model-len (a 400 is right) and clients that
disconnect mid-stream. It passes with no server error (5xx or a dropped connection), the server still
healthy at the end, and every greedy request inside the mix answered exactly as a server without
speculation answers it. Then `dresd-bench serve --base-url` and vLLM's own `vllm bench serve` measure
the same running server.

A long run of the online store: a small store filled many times over with its spool on, the
proposer's step time and the server's memory sampled (flat once the store is full), every verified
state spooled, and a restart that reloads the spool and drafts from it at once.
"""

import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from conftest import DATA, ENGINE_DEFAULTS, K
from request_mix import make_mix, run_mix

from benchmarks.server import engine_flags, vllm_server
from dresd_vllm.online.spool import projection_id, read_spool
from dresd_vllm.store.datastore import Datastore

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 192  # about 3 minutes with both servers' start-up on the 2-core CI machine


def _measure(base_url: str, model: str, prompts: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """`dresd-bench serve --base-url` at a request rate and vLLM's own load test (`vllm bench serve`'s code and
    options), each as users run it, against the running server: their reports."""
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in prompts))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = tmp_path / "serve-url"
    commands = [
        ["benchmarks.cli", "serve", "--model", model, "--dataset", str(dataset), "--limit", "4", "--max-tokens", "24",
         "--base-url", base_url, "--concurrency", "2", "--requests", "6", "--request-rate", "20", "--out", str(out)],
        ["benchmarks.vllm_bench_serve", "--base-url", base_url, "--model", model, "--dataset-name", "random",
         "--random-input-len", "16", "--random-output-len", "16", "--num-prompts", "4", "--max-concurrency", "2",
         "--request-rate", "20", "--temperature", "0", "--save-result", "--result-dir", str(tmp_path),
         "--result-filename", "vllm-bench.json"],
    ]  # fmt: skip
    for command in commands:
        run = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "serve.json").read_text()), json.loads((tmp_path / "vllm-bench.json").read_text())


def test_dresd_server_soak(tiny_model, prompts, own_datastore, tmp_path, monkeypatch):
    """The mix through a DReSD server; then both load tests measure the same server (one start serves all three)."""
    mix = make_mix(REQUESTS)
    greedy = [i for i, r in enumerate(mix) if r.greedy]
    flags = engine_flags(ENGINE_DEFAULTS)
    with vllm_server(tiny_model, *flags, log=tmp_path / "plain.log") as base_url:
        plain = run_mix(base_url, tiny_model, [mix[i] for i in greedy])
    assert not plain.bad, plain.bad

    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "2")
    config = json.dumps({"method": "dresd", "datastore": own_datastore, "num_speculative_tokens": K})
    log = tmp_path / "dresd.log"
    with vllm_server(tiny_model, *flags, "--speculative-config", config, log=log) as base_url:
        soak = run_mix(base_url, tiny_model, mix)
        healthy = requests.get(f"{base_url}/health", timeout=30).status_code
        metrics = requests.get(f"{base_url}/metrics", timeout=30).text
        served, vllm_bench = _measure(base_url, tiny_model, prompts, tmp_path)

    matched = sum(soak.texts.get(i) == plain.texts[j] for j, i in enumerate(greedy))
    accepted = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("vllm:spec_decode_num_accepted_tokens_total{")
    )
    summary = dict(
        requests=len(mix), greedy=len(greedy), greedy_matched=matched, errors=dict(soak.errors),
        too_long=sum(r.too_long for r in mix), disconnects=sum(r.disconnect for r in mix),
        completion_tokens=soak.tokens, seconds=round(soak.seconds, 1), tokens_per_s=round(soak.tokens / soak.seconds),
        accepted_tokens=accepted,
    )  # fmt: skip
    print(f"\nsoak: {summary}")
    assert not soak.bad, soak.bad
    assert healthy == 200
    assert matched == len(greedy), summary
    assert accepted > 0
    # The proposer's lines appear in the server log, where vLLM's own do (start-up and periodic timings).
    text = log.read_text()
    assert "DReSD: " in text and " keys from " in text, text[-3000:]
    assert "DresdProposer: " in text and " ms/step proposing" in text, text[-3000:]

    assert vllm_bench["completed"] == 4 and vllm_bench["spec_decode_num_drafts"] > 0
    (server,) = served["methods"]
    assert server["model"] == tiny_model and server["name"] == f"server {base_url}"
    (level,) = server["levels"]
    assert level["requests"] == 6 and level["request_rate"] == 20 and level["lossless"] is None
    # Served, tokens per step is estimated from the counters (output - accepted tokens): no step hook.
    assert level["drafts"] > 0 and level["tokens_per_step"] > 1


def test_mix_is_what_the_soak_promises():
    mix = make_mix(REQUESTS)
    kinds = collections.Counter(r.kind for r in mix)
    assert kinds["completion"] > 40 and kinds["chat"] > 40
    assert sum(r.greedy for r in mix) > 50 and sum(r.stream for r in mix if r.greedy) > 10
    assert sum(r.params.get("n", 1) == 2 for r in mix) > 5 and sum("stop" in r.params for r in mix) > 5
    assert sum("logprobs" in r.params for r in mix) > 5 and sum("seed" in r.params for r in mix) > 10
    assert sum(r.too_long for r in mix) >= 5 and sum(r.disconnect for r in mix) >= 5


STORE = 500  # online_store_size: the soak's requests fill it about ten times
SOAK_REQUESTS, SOAK_TOKENS, SOAK_CLIENTS = 240, 40, 8


def _prompts() -> tuple[list[str], list[str]]:
    """The soak's distinct prompts, and 8 more that are served before and after the restart."""
    paragraphs = [p for p in (DATA / "corpus.txt").read_text().split("\n\n") if len(p) > 120]
    prompts = [paragraphs[i % len(paragraphs)][i // len(paragraphs) * 7 :][:100] for i in range(SOAK_REQUESTS + 8)]
    return prompts[:SOAK_REQUESTS], prompts[SOAK_REQUESTS:]


def _complete(
    base_url: str, model: str, prompts: list[str], clients: int, answered: Callable[[], None] | None = None
) -> list[dict]:
    """Greedy completions of `prompts` from `clients` concurrent clients; `answered` is called after each answer."""

    def one(prompt: str) -> dict:
        body = dict(model=model, prompt=prompt, max_tokens=SOAK_TOKENS, temperature=0.0)
        response = requests.post(f"{base_url}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        data = response.json()
        if answered is not None:
            answered()
        return dict(text=data["choices"][0]["text"], tokens=data["usage"]["completion_tokens"])

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, prompts))


def _stats(base_url: str) -> dict:
    """The proposer's `dresd_stats` (the server runs with VLLM_SERVER_DEV_MODE=1, which serves /collective_rpc)."""
    response = requests.post(f"{base_url}/collective_rpc", json={"method": "dresd_stats"}, timeout=30)
    response.raise_for_status()
    return response.json()["results"][0]


def _server_rss(base_url: str) -> dict[str, int]:
    """Resident memory of the server listening on base_url's port and of each of its processes (vLLM titles
    them: VLLM::EngineCore, VLLM::Worker...), in bytes."""
    port = base_url.rsplit(":", 1)[1]
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "--port" in cmdline and cmdline[cmdline.index("--port") + 1] == port:
            out = {}
            for p in [process, *process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    name = (p.cmdline() or ["?"])[0].split()[0] if p is not process else "api"
                    out[name] = out.get(name, 0) + p.memory_info().rss
            return out
    raise RuntimeError(f"no server process on port {port}")


class _Sampler:
    """Samples the proposer's cumulative stats and the server's memory after every `every`-th answered request.

    Counted in requests, not seconds, so a fast machine takes as many samples as a slow one (a clock-driven
    sampler took fewer than the flatness checks need on a quiet machine). Samples are taken one at a time,
    in order, by the client thread whose answer completes the count.
    """

    def __init__(self, base_url: str, every: int):
        self.base_url, self.every, self.samples = base_url, every, []
        self._answered = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self._answered += 1
            if self._answered % self.every == 0:
                self.samples.append(dict(_stats(self.base_url), rss=_server_rss(self.base_url)))


def _tokens_per_step(base_url: str, model: str, prompts: list[str]) -> tuple[float, list[dict]]:
    """Serve `prompts` one at a time: completion tokens per engine step (the proposer counts the steps)."""
    before = _stats(base_url)["steps"]
    answers = _complete(base_url, model, prompts, clients=1)
    return sum(a["tokens"] for a in answers) / (_stats(base_url)["steps"] - before), answers


def test_online_store_soak_flat_lossless_and_restart(tiny_model, own_datastore, llm_factory, tmp_path, monkeypatch):
    """A 500-key online store filled ten times through the server: the proposer's step time and the server's
    memory stay flat once it is full, every verified state reaches the spool, outputs equal plain decoding's,
    and a restart reloads the spool and drafts the previous run's answers from its first step."""
    from vllm import SamplingParams

    mix, repeated = _prompts()
    llm = llm_factory(tiny_model, max_num_seqs=SOAK_CLIENTS)  # in-process: the plain reference in seconds
    params = SamplingParams(temperature=0.0, max_tokens=SOAK_TOKENS)
    plain = [o.outputs[0].text for o in llm.generate(mix + repeated, params, use_tqdm=False)]
    llm.llm_engine.engine_core.shutdown()

    flags = engine_flags({**ENGINE_DEFAULTS, "max_num_seqs": SOAK_CLIENTS})
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    spool = tmp_path / "spool"
    config = json.dumps(
        {"method": "dresd", "datastore": own_datastore, "num_speculative_tokens": K, "online_store_size": STORE,
         "online_store_path": str(spool)}
    )  # fmt: skip
    started = time.monotonic()
    with vllm_server(tiny_model, *flags, "--speculative-config", config, log=tmp_path / "first.log") as base_url:
        sampler = _Sampler(base_url, every=SOAK_CLIENTS)  # 30 samples, all but the first one or two of a full store
        soak = _complete(base_url, tiny_model, mix, SOAK_CLIENTS, answered=sampler)
        cold, first_answers = _tokens_per_step(base_url, tiny_model, repeated)
        first = _stats(base_url)
        deadline = time.monotonic() + 60  # the last partial chunk goes to disk once it has waited FLUSH_S
        while first["spool_written_keys"] < first["spooled_keys"] and time.monotonic() < deadline:
            time.sleep(0.5)
            first = _stats(base_url)
    served = time.monotonic() - started

    # Lossless, and nothing lost: every verified state (one per completion token, and those a last step verified
    # past max_tokens) is in the spool on disk.
    assert [a["text"] for a in soak + first_answers] == plain
    completion_tokens = sum(a["tokens"] for a in soak + first_answers)
    assert first["spooled_keys"] >= completion_tokens and first["faults"] == 0
    assert first["spool_written_keys"] == first["spooled_keys"] and first["spool_dropped_keys"] == 0
    on_disk = read_spool(spool, projection_id(Datastore.load(own_datastore).projection))
    assert len(on_disk.keys) == first["spooled_keys"]

    # Flat once full: the proposer's time per step over each sampling window, and the server's memory.
    full = [s for s in sampler.samples if s["spooled_keys"] >= STORE]  # as many keys added as the store holds
    assert completion_tokens > 16 * STORE and len(full) >= 10, (completion_tokens, len(sampler.samples))
    windows = [
        1e3 * (b["propose_s"] - a["propose_s"]) / (b["steps"] - a["steps"])
        for a, b in zip(full, full[1:], strict=False)
        if b["steps"] > a["steps"]
    ]
    early, late = windows[: len(windows) // 2], windows[len(windows) // 2 :]
    # Memory: the worker's pages warm up (KV blocks, allocator pools) over the first fills; over the second half
    # of the run after the store is full, nothing may grow.
    later = full[len(full) // 2 :]
    total = [sum(x["rss"].values()) / 2**20 for x in full]
    summary = dict(
        requests=len(soak), completion_tokens=completion_tokens, seconds=round(served, 1),
        store_fills=round(completion_tokens / STORE, 1), online_keys=first["online_keys"], samples=len(full),
        propose_ms_early=round(sum(early) / len(early), 3), propose_ms_late=round(sum(late) / len(late), 3),
        rss_mib={k: round(v / 2**20) for k, v in full[-1]["rss"].items()},
        rss_total_mib_full_mid_last=[round(total[0]), round(total[len(full) // 2]), round(total[-1])],
        token_price_b1=first["token_price_b1"], token_price_b8=first["token_price_b8"],
        price_steps=first["price_steps"],
    )  # fmt: skip
    print(f"\nonline store soak: {summary}")
    assert summary["propose_ms_late"] <= 2.0 * summary["propose_ms_early"] + 0.5, summary
    assert sum(later[-1]["rss"].values()) - sum(later[0]["rss"].values()) < 64 * 2**20, summary

    # A restart with the same spool drafts the repeated prompts' earlier answers from its first step.
    with vllm_server(tiny_model, *flags, "--speculative-config", config, log=tmp_path / "second.log") as base_url:
        reloaded = _stats(base_url)["reloaded_keys"]
        warm, second_answers = _tokens_per_step(base_url, tiny_model, repeated)
    summary.update(reloaded_keys=reloaded, tokens_per_step_before=round(cold, 2), tokens_per_step_after=round(warm, 2))
    print(f"online store restart: {summary}")
    assert reloaded == STORE and [a["text"] for a in second_answers] == [a["text"] for a in first_answers]
    assert warm > cold + 1.0, summary
    log = (tmp_path / "second.log").read_text()
    assert re.search(rf"DReSD: online store spool {spool}: {STORE} keys reloaded, appending", log), log[-3000:]
