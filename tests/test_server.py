"""DReSD behind vLLM's OpenAI server, driven by the official `openai` client."""

import json

import openai
import pytest
import requests
from conftest import K, vllm_server
from request_mix import make_mix, run_mix


def _complete(base_url: str, model: str, prompts: list[str]) -> dict:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
    completions = [
        client.completions.create(model=model, prompt=p, max_tokens=48, temperature=0.0).choices[0].text
        for p in prompts
    ]
    messages = [{"role": "user", "content": prompts[0]}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0.0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0.0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return {"completions": completions, "chat": chat.choices[0].message.content, "streamed": streamed}


def _accepted_tokens(base_url: str) -> float:
    lines = requests.get(f"{base_url}/metrics", timeout=10).text.splitlines()
    # The counter's sample only: the `_created` line beside it holds a timestamp.
    total = "vllm:spec_decode_num_accepted_tokens_total{"
    return sum(float(line.split()[-1]) for line in lines if line.startswith(total))


@pytest.fixture(scope="module")
def plain_server_outputs(tiny_model, prompts) -> dict:
    with vllm_server(tiny_model) as base_url:
        return _complete(base_url, tiny_model, prompts[:4])


def test_server_with_dresd_matches_plain_server(tiny_model, prompts, own_datastore, plain_server_outputs):
    config = json.dumps({"method": "dresd", "datastore": own_datastore, "num_speculative_tokens": K})
    with vllm_server(tiny_model, "--speculative-config", config) as base_url:
        outputs = _complete(base_url, tiny_model, prompts[:4])
        accepted = _accepted_tokens(base_url)
    assert outputs == plain_server_outputs
    assert outputs["streamed"] == outputs["chat"]
    assert accepted > 0


@pytest.fixture(scope="module")
def mixed_plain(tiny_model) -> tuple[list, dict]:
    """A short request mix (see request_mix) and the plain server's answers to its greedy requests."""
    mix = make_mix(48, seed=1)
    greedy = [r for r in mix if r.greedy]
    with vllm_server(tiny_model) as base_url:
        plain = run_mix(base_url, tiny_model, greedy)
    assert not plain.bad, plain.bad
    return mix, plain.texts


@pytest.mark.parametrize("method", ["ngram", "rest"])
def test_greedy_in_mixed_server_batches_equals_plain_server(tiny_model, rest_datastore, mixed_plain, method):
    mix, plain = mixed_plain
    config = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    if method == "rest":
        config = {"method": "rest", "datastore": rest_datastore, "num_speculative_tokens": K}
    with vllm_server(tiny_model, "--speculative-config", json.dumps(config)) as base_url:
        outcome = run_mix(base_url, tiny_model, mix)
        accepted = _accepted_tokens(base_url)
    assert not outcome.bad, outcome.bad
    greedy = [i for i, r in enumerate(mix) if r.greedy]
    assert [outcome.texts[i] for i in greedy] == [plain[j] for j in range(len(greedy))]
    assert accepted > 0
