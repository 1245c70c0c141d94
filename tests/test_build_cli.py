"""dresd-build's conventions: vLLM's and HF's option names, the dtype pinned and recorded, typos refused early."""

import json
import logging

import pytest
import torch
from conftest import gen_args, in_process_vllm

from build_tools.cli import main, parse_args, resolve_dtype
from dresd_vllm.spec.proposer import warn_dtype


def test_datastore_reads_the_response_key_generate_recorded(generated, tmp_path, capsys):
    out, _, _ = generated
    assert json.loads(out.with_name(out.name + ".meta.json").read_text())["response_key"] == "output"
    # `generate --out id.jsonl` then `datastore --dataset id.jsonl`: the model's answers, not the human ones.
    for command in (["datastore", "--out", str(tmp_path / "ds")], ["rest", "--out", str(tmp_path / "r.npz")]):
        assert parse_args([*command, "--dataset", str(out)]).response_key == "output"
        assert "what `dresd-build generate` recorded" in capsys.readouterr().err
        assert parse_args([*command, "--dataset", str(out), "--response-key", "text"]).response_key == "text"
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"instruction": "a", "response": "b"}\n')
    assert parse_args(["datastore", "--dataset", str(plain), "--out", str(tmp_path / "ds")]).response_key == "response"


def test_rest_takes_model_like_every_other_command(tmp_path):
    for flag in ("--model", "--tokenizer"):
        assert parse_args(["rest", flag, "some/model", "--out", str(tmp_path / "r.npz")]).model == "some/model"


def test_trust_remote_code_and_revision_reach_hugging_face_and_vllm(tmp_path):
    args = parse_args(["datastore", "--out", str(tmp_path / "ds"), "--trust-remote-code", "--revision", "v1"])
    assert args.hf == {"trust_remote_code": True, "revision": "v1"}
    assert args.engine_args["trust_remote_code"] is True and args.engine_args["revision"] == "v1"
    # vLLM's own names inside --engine-args count too, for AutoConfig/AutoTokenizer as well.
    args = parse_args(["rest", "--out", str(tmp_path / "r.npz"), "--revision", "v2"])
    assert args.hf == {"revision": "v2"}
    args = parse_args(["generate", "--out", str(tmp_path / "g.jsonl"), "--engine-args", '{"revision": "v3"}'])
    assert args.hf == {"revision": "v3"}


def test_dtype_flag_and_engine_args_dtype_are_one_setting(tmp_path):
    out = ["datastore", "--out", str(tmp_path / "ds")]
    assert parse_args([*out, "--dtype", "half"]).engine_args["dtype"] == "float16"
    assert parse_args([*out, "--engine-args", '{"dtype": "float32"}']).engine_args["dtype"] == "float32"
    assert parse_args([*out, "--dtype", "bfloat16", "--engine-args", '{"dtype": "float32"}']).engine_args == {
        "dtype": "bfloat16"
    }
    assert "dtype" not in parse_args(out).engine_args  # auto: resolved once, by resolve_dtype


def test_dtype_auto_is_what_vllm_serves_the_model_at(tiny_model, llm_factory, tmp_path):
    args = parse_args(["generate", "--model", tiny_model, "--out", str(tmp_path / "g.jsonl")])
    resolve_dtype(args)
    llm = llm_factory(tiny_model, dtype="auto")
    assert args.engine_args["dtype"] == str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")


def test_a_typo_in_engine_args_is_refused_before_anything_is_written(tiny_model, build_corpus, tmp_path, capsys):
    out = tmp_path / "id.jsonl"
    argv = gen_args(tiny_model, build_corpus, out)
    argv[argv.index("--engine-args") + 1] = '{"tensor_paralel_size": 1}'
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not vllm.LLM arguments: ['tensor_paralel_size']" in err and "did you mean 'tensor_parallel_size'" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.engine
def test_generate_says_starting_engine_and_rates_leave_start_up_out(tiny_model, build_corpus, tmp_path, capsys):
    out = tmp_path / "id.jsonl"
    with in_process_vllm():
        assert main(gen_args(tiny_model, build_corpus, out, "--limit", "2")) == 0
    captured = capsys.readouterr()
    assert "generate: starting engine" in captured.err
    assert "s of engine start-up" in captured.out
    assert json.loads(out.with_name(out.name + ".meta.json").read_text())["dtype"] == "float32"


def test_serving_warns_when_the_datastore_was_built_at_another_dtype(caplog):
    vllm_logger = logging.getLogger("vllm")  # vLLM's logger tree does not propagate to the root
    vllm_logger.addHandler(caplog.handler)
    try:
        assert warn_dtype("bfloat16", torch.float32, "ds") is True
    finally:
        vllm_logger.removeHandler(caplog.handler)
    assert "built at dtype bfloat16 but the model is served at float32" in caplog.text
    assert warn_dtype("float32", torch.float32, "ds") is False
    assert warn_dtype(None, torch.float32, "ds") is False  # a datastore from before the field: nothing known
