"""A bounded soak of the OpenAI server with DReSD: 16 concurrent `openai` clients, a realistic mix.

Completions and chat, streaming and not, greedy and sampled, n=2, stop strings, logprobs, prompts
over max-model-len (a 400 is right) and clients that disconnect mid-stream. It passes with no
server error (5xx or a dropped connection), the server still healthy at the end, and every greedy
request inside the mix answered exactly as a server without speculation answers it.
"""

import collections
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
import requests
from conftest import DATA, ENGINE_DEFAULTS, K

from benchmarks.server import engine_flags, vllm_server

CLIENTS = 16
REQUESTS = 192  # about 3 minutes with both servers' start-up on the 2-core CI machine
MAX_TOKENS = 32


@dataclass
class Request:
    """One request of the mix; `greedy` ones must equal the plain server's answer."""

    kind: str  # completion | chat
    prompt: str
    params: dict = field(default_factory=dict)
    stream: bool = False
    disconnect: bool = False  # stop reading after two chunks and close the connection
    too_long: bool = False  # over max-model-len: the server must answer 400

    @property
    def greedy(self) -> bool:
        return self.params.get("temperature", 1.0) == 0.0 and not self.disconnect and not self.too_long


def make_mix(count: int, seed: int = 0) -> list[Request]:
    """`count` requests: 40% greedy, the rest sampled, n=2, stops, logprobs, too long, disconnects."""
    rng = random.Random(seed)
    paragraphs = [p for p in (DATA / "corpus.txt").read_text().split("\n\n") if len(p) > 60]
    mix = []
    for i in range(count):
        prompt = paragraphs[i % len(paragraphs)][: rng.randint(40, 160)]
        kind = rng.choice(["completion", "chat"])
        roll = rng.random()
        params: dict = {"max_tokens": MAX_TOKENS, "temperature": 0.0}
        request = Request(kind, prompt, params, stream=rng.random() < 0.4)
        if roll < 0.4:
            if rng.random() < 0.3:
                params["stop"] = [" the", "\n\n"]
            if rng.random() < 0.3:
                params["logprobs"] = 2 if kind == "completion" else True
        elif roll < 0.85:
            params.update(temperature=rng.choice([0.5, 0.8, 1.2]), top_p=rng.choice([1.0, 0.9]))
            if rng.random() < 0.5:
                params["seed"] = i
            if rng.random() < 0.25:
                params["n"] = 2
                request.stream = False
        elif roll < 0.93:
            request.prompt = " ".join(paragraphs)[:8000]  # thousands of tokens; max-model-len is 512
            request.too_long, request.stream = True, False
        else:
            request.disconnect, request.stream = True, True
            params["max_tokens"] = 200
        mix.append(request)
    return mix


def send(client: openai.OpenAI, model: str, request: Request) -> tuple[list[str], int]:
    """The choices' texts and the completion tokens of one request."""
    args = dict(model=model, stream=request.stream, **request.params)
    if request.kind == "completion":
        call, args["prompt"] = client.completions.create, request.prompt
    else:
        call, args["messages"] = client.chat.completions.create, [{"role": "user", "content": request.prompt}]
        if "logprobs" in args:
            args["top_logprobs"] = 2
    if request.stream:
        args["stream_options"] = {"include_usage": True}
    response = call(**args)
    if not request.stream:
        texts = [c.text if request.kind == "completion" else c.message.content for c in response.choices]
        return texts, response.usage.completion_tokens
    texts: dict[int, str] = collections.defaultdict(str)
    used = 0
    for i, chunk in enumerate(response):
        if request.disconnect and i == 2:
            response.close()
            return [], 0
        for c in chunk.choices:
            texts[c.index] += (c.text if request.kind == "completion" else c.delta.content) or ""
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return [texts[i] for i in sorted(texts)], used


@dataclass
class Outcome:
    texts: dict[int, list[str]] = field(default_factory=dict)
    errors: collections.Counter = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)  # what must not happen, with the request
    tokens: int = 0
    seconds: float = 0.0


def run_mix(base_url: str, model: str, mix: list[Request]) -> Outcome:
    """Send `mix` from CLIENTS threads; classify every error."""
    outcome, lock = Outcome(), threading.Lock()
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300)

    def one(i: int) -> None:
        request = mix[i]
        try:
            texts, used = send(client, model, request)
        except openai.APIStatusError as e:
            with lock:
                outcome.errors[str(e.status_code)] += 1
                if not (request.too_long and e.status_code == 400):
                    outcome.bad.append(f"{e.status_code} for {request}: {e}")
            return
        except openai.APIError as e:  # connection dropped, timeout
            with lock:
                outcome.errors[type(e).__name__] += 1
                outcome.bad.append(f"{type(e).__name__} for {request}: {e}")
            return
        with lock:
            outcome.texts[i], outcome.tokens = texts, outcome.tokens + used
            if request.too_long:
                outcome.bad.append(f"no 400 for a prompt over max-model-len: {request.kind}")

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(len(mix))))
    outcome.seconds = time.perf_counter() - start
    return outcome


def test_dresd_server_soak(tiny_model, own_datastore, tmp_path, monkeypatch):
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


def test_mix_is_what_the_soak_promises():
    mix = make_mix(REQUESTS)
    kinds = collections.Counter(r.kind for r in mix)
    assert kinds["completion"] > 40 and kinds["chat"] > 40
    assert sum(r.greedy for r in mix) > 50 and sum(r.stream for r in mix if r.greedy) > 10
    assert sum(r.params.get("n", 1) == 2 for r in mix) > 5 and sum("stop" in r.params for r in mix) > 5
    assert sum("logprobs" in r.params for r in mix) > 5 and sum("seed" in r.params for r in mix) > 10
    assert sum(r.too_long for r in mix) >= 5 and sum(r.disconnect for r in mix) >= 5
