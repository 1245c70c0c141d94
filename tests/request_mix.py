"""The OpenAI request mix of the server tests (test_soak, test_server) and the 16 clients that send it.

Completions and chat, streaming and not, greedy and sampled, n=2, stop strings, logprobs, prompts
over max-model-len (a 400 is right) and clients that disconnect mid-stream.
"""

import collections
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
from conftest import DATA

CLIENTS = 16
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
