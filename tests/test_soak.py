"""A bounded soak of the OpenAI server with DReSD: 16 concurrent `openai` clients, a realistic mix.

Completions and chat, streaming and not, greedy and sampled, n=2, stop strings, logprobs, prompts
over max-model-len (a 400 is right) and clients that disconnect mid-stream. It passes with no
server error (5xx or a dropped connection), the server still healthy at the end, and every greedy
request inside the mix answered exactly as a server without speculation answers it.
"""

import collections
import json

import requests
from conftest import ENGINE_DEFAULTS, K
from request_mix import make_mix, run_mix

from benchmarks.server import engine_flags, vllm_server

REQUESTS = 192  # about 3 minutes with both servers' start-up on the 2-core CI machine


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
