"""`dresd-build datastore` and `eval` on the tiny model: contents, served-state consistency, resume, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import BUILD_MAX_LENGTH, ENGINE_DEFAULTS, build_args, in_process_vllm
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams

from build_tools.build import read_corpus, run_datastore, work_dir
from build_tools.cli import main, parse_args
from build_tools.evaluate import run_eval
from build_tools.tiny_model import make_llama, save_checkpoint, train_tokenizer
from dresd_vllm import patches
from dresd_vllm.store.datastore import Datastore


def corpus_of(tiny_model, build_corpus, out):
    """The token sequences the shared build embedded, in key order."""
    args = parse_args(build_args(tiny_model, build_corpus, out))
    return read_corpus(args, AutoTokenizer.from_pretrained(tiny_model))


def all_keys(ds: Datastore) -> np.ndarray:
    return ds.index.index.reconstruct_n(0, ds.index.ntotal)


def test_datastore_holds_every_position_and_its_next_tokens(tiny_model, build_corpus, single_build):
    out, summary = single_build
    ds = Datastore.load(out)
    corpus = corpus_of(tiny_model, build_corpus, out)
    m = ds.manifest
    assert (m.model, m.template, m.n_next, m.pca_dim, m.hidden_size) == (tiny_model, "chat", 20, 64, 128)
    assert m.num_keys == corpus.lengths.sum() == summary["keys"]
    assert summary["skipped_empty"] == 1 and summary["sequences"] == 24
    assert summary["truncated"] > 0 and corpus.lengths.max() == BUILD_MAX_LENGTH
    assert m.build["corpus"]["truncated"] == summary["truncated"]
    assert not work_dir(out).exists()

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    starts = np.concatenate(([0], np.cumsum(corpus.lengths)))
    for seq_id, pos in [(0, 0), (0, 5), (3, 100), (23, int(corpus.lengths[23]) - 1)]:
        seq = corpus.sequences()[seq_id].tolist()
        expected = (seq[pos + 1 :] + [eos] * 21)[:21]
        assert ds.continuations(np.array([starts[seq_id] + pos]))[0].tolist() == expected


def test_keys_are_the_states_the_proposer_captures_when_serving(tiny_model, build_corpus, single_build, llm_factory):
    """For a prefix p of a corpus sequence, key len(p)-1 is the projected state the served model produces."""
    out, _ = single_build
    corpus = corpus_of(tiny_model, build_corpus, out)
    seq_id, length = 2, 60
    seq = corpus.sequences()[seq_id].tolist()
    key_id = int(corpus.lengths[:seq_id].sum()) + length - 1
    ds = Datastore.load(out)

    # Serve p = seq[:length] with DReSD over this datastore; record the state the proposer is handed.
    llm = llm_factory(
        tiny_model, speculative_config={"method": "dresd", "datastore": str(out), "num_speculative_tokens": 4}
    )

    def record(worker):
        drafter = worker.model_runner.drafter
        drafter.captured = []
        propose = drafter.propose

        def recording(sampled_token_ids, *args, **kwargs):
            states, metadata = drafter._captured
            verified = patches.verified_states(states, sampled_token_ids, metadata)
            drafter.captured.append(verified.detach().float().cpu().clone())
            return propose(sampled_token_ids, *args, **kwargs)

        drafter.propose = recording

    llm.collective_rpc(record)
    (served,) = llm.generate([{"prompt_token_ids": seq[:length]}], SamplingParams(temperature=0, max_tokens=2))
    (captured,) = llm.collective_rpc(lambda worker: worker.model_runner.drafter.captured)
    state = captured[0][0]  # first step: the state at position length-1, which produced the first token

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        hf_out = hf(torch.tensor([seq]), output_hidden_states=True)
        captured_token = int(hf.lm_head(state).argmax())

    key = torch.from_numpy(all_keys(ds)[key_id])
    captured_vs_hf = float((state - hf_out.hidden_states[-1][0, length - 1]).abs().max())
    key_vs_captured = float((ds.projection(state[None]).float()[0] - key).abs().max())
    print(
        f"max |captured - transformers| = {captured_vs_hf:.3g}, max |key - projected captured| = {key_vs_captured:.3g}"
    )
    assert captured_vs_hf < 1e-4 and key_vs_captured < 2e-3  # keys are fp16
    assert captured_token == served.outputs[0].token_ids[0]
    scores, _ = ds.index.search(ds.projection(state[None]), 1)
    assert scores[0, 0] > 0.999


def test_rerun_is_a_no_op_and_a_different_datastore_is_not_overwritten(tiny_model, build_corpus, single_build, capsys):
    out, _ = single_build
    manifest = (out / "manifest.json").read_text()
    assert main(build_args(tiny_model, build_corpus, out)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(build_args(tiny_model, build_corpus, out, "--n-next", "10")) == 2
    err = capsys.readouterr().err
    assert "already holds a different datastore" in err and "n_next: 20 then, 10 now" in err and "--overwrite" in err
    assert (out / "manifest.json").read_text() == manifest


def test_interrupted_build_leaves_no_datastore_and_resumes_from_its_shards(
    tiny_model, build_corpus, single_build, tmp_path, monkeypatch
):
    out = tmp_path / "ds"
    args = parse_args(build_args(tiny_model, build_corpus, out))

    def crash(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("build_tools.build.write_datastore", crash)
    with in_process_vllm(), pytest.raises(KeyboardInterrupt):
        run_datastore(args)
    assert not out.exists()
    shards = sorted((work_dir(out) / "shards").iterdir())
    assert len(shards) >= 3 and not (work_dir(out) / "manifest.json").exists()
    lost = np.load(shards[1]).shape[0]
    shards[1].unlink()
    monkeypatch.undo()

    # A different model or tokenizer may not resume this work.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    wider = save_checkpoint(make_llama(tokenizer, hidden_size=64, num_heads=2), tokenizer, tmp_path / "wider")
    assert main(build_args(str(wider), build_corpus, out)) == 2
    other_tok = train_tokenizer(["a b c d e f g"] * 50, vocab_size=300)
    retok = save_checkpoint(make_llama(other_tok, hidden_size=128), other_tok, tmp_path / "retok")
    with pytest.raises(Exception, match="cannot resume .* a different model .*tokenizer_fingerprint"):
        run_datastore(parse_args(build_args(str(retok), build_corpus, out, "--prompt-key", "instruction")))

    with in_process_vllm():
        summary = run_datastore(args)
    assert summary["embedded_tokens"] == lost
    assert not work_dir(out).exists()
    single, resumed = Datastore.load(single_build[0]), Datastore.load(out)
    assert np.array_equal(all_keys(single), all_keys(resumed))
    assert np.array_equal(single.tokens, resumed.tokens)


def test_model_of_other_hidden_size_is_refused_naming_the_field(tiny_model, build_corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    (work_dir(out) / "shards").mkdir(parents=True)
    plan = {"model": tiny_model, "hidden_size": 4096, "vocab_size": 512, "tokenizer_fingerprint": "x"}
    (work_dir(out) / "plan.json").write_text(json.dumps(plan))
    assert main(build_args(tiny_model, build_corpus, out)) == 2
    err = capsys.readouterr().err
    assert "a different model" in err and "hidden_size: 4096 then, 128 now" in err and "--overwrite" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt-key", "question"], "no key 'question' in the row"),
        (["--response-key", "answer"], "keys present: ['instruction', 'lineno', 'module', 'qualname', 'response']"),
        (["--index", "IVF-nonsense"], "--index 'IVF-nonsense': not a FAISS factory string"),
        (["--max-length", "100000"], "exceeds the context"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_model, build_corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "ds"
    assert main(build_args(tiny_model, build_corpus, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not work_dir(out).exists()


def test_bad_flags_are_refused_by_the_parser(tiny_model, build_corpus, tmp_path, capsys):
    for extra in (["--limit", "0"], ["--engine-args", '{"max_model_len": 4}'], ["--engine-args", "[1]"]):
        with pytest.raises(SystemExit):
            parse_args(build_args(tiny_model, build_corpus, tmp_path / "ds", *extra))
    err = capsys.readouterr().err
    assert "must be >= 1" in err and "set by dresd-build" in err and "expected a JSON object" in err


def test_output_directory_that_is_not_a_datastore_is_refused(tiny_model, build_corpus, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert main(build_args(tiny_model, build_corpus, tmp_path / "notes")) == 2
    assert "not a datastore" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_eval_reports_recall_and_mrr_on_stored_and_held_out_queries(build_corpus, single_build):
    out, _ = single_build
    stored = run_eval(parse_args(["eval", str(out), "--queries", "200"]))
    assert stored["recall_at_k"] == 1.0 and stored["query_source"] == "stored keys"
    assert 0.5 < stored["mrr"] <= 1.0

    engine = json.dumps({k: v for k, v in ENGINE_DEFAULTS.items() if k != "max_model_len"})
    argv = ["eval", str(out), "--dataset", str(build_corpus), "--limit", "3", "--queries", "100"]
    with in_process_vllm():
        held_out = run_eval(parse_args([*argv, "--engine-args", engine, "--max-length", str(BUILD_MAX_LENGTH)]))
    assert held_out["queries"] == 100 and held_out["query_source"].startswith("held-out")
    assert held_out["recall_at_k"] == 1.0  # a Flat index is exact
