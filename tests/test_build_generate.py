"""`dresd-build generate`: every row kept with its response, resumable, and feeding `datastore` (the ID setting)."""

from conftest import build_args, gen_args, in_process_vllm, read_rows

from build_tools.build import run_datastore
from build_tools.cli import main, parse_args
from dresd_vllm.store.datastore import Datastore


def test_every_row_keeps_its_fields_gains_a_response_and_none_is_lost_or_repeated(build_corpus, generated):
    out, first, resumed = generated
    assert first["generated_rows"] == 6 and resumed["generated_rows"] == 4
    inputs = read_rows(build_corpus)[:10]
    rows = read_rows(out)
    assert len(rows) == 10
    for row, source in zip(rows, inputs, strict=True):
        assert {k: v for k, v in row.items() if k != "output"} == source
        assert isinstance(row["output"], str)
    assert sum(len(r["output"]) > 0 for r in rows) >= 8
    assert not out.with_name(out.name + ".parts").exists()


def test_rerun_of_a_complete_file_does_nothing_and_other_settings_are_refused(
    tiny_model, build_corpus, generated, capsys
):
    out, _, _ = generated
    before = out.read_text()
    assert main(gen_args(tiny_model, build_corpus, out, "--limit", "10")) == 0
    assert "complete, 10 rows; nothing to do" in capsys.readouterr().out
    assert main(gen_args(tiny_model, build_corpus, out, "--limit", "10", "--max-tokens", "9")) == 2
    err = capsys.readouterr().err
    assert "max_tokens: 8 then, 9 now" in err and "--overwrite" in err
    assert out.read_text() == before


def test_bad_generate_input_is_refused_before_anything_is_written(tiny_model, build_corpus, tmp_path, capsys):
    out = tmp_path / "id.jsonl"
    assert main(gen_args(tiny_model, build_corpus, out, "--response-key", "response")) == 2
    assert "row 0 already has a field 'response'" in capsys.readouterr().err
    assert main(gen_args(tiny_model, build_corpus, out, "--prompt-key", "question")) == 2
    assert "no key 'question' in the row" in capsys.readouterr().err
    assert not out.exists()
    out.write_text("someone else's notes\n")
    assert main(gen_args(tiny_model, build_corpus, out)) == 2
    assert "was not written by `dresd-build generate`" in capsys.readouterr().err
    assert out.read_text() == "someone else's notes\n"


def test_generated_file_feeds_the_datastore_directly(tiny_model, generated, tmp_path):
    out, _, _ = generated
    # No --response-key: the datastore reads the one generate recorded, so it holds the model's answers.
    args = build_args(tiny_model, out, tmp_path / "id-ds", "--pca-sample", "500")
    with in_process_vllm():
        summary = run_datastore(parse_args(args))
    ds = Datastore.load(tmp_path / "id-ds")
    assert ds.manifest.num_keys == summary["tokens"] and summary["sequences"] + summary["skipped_empty"] == 10
    assert ds.manifest.build["request"]["response_key"] == "output"
    # The numerics the keys were made at, for the serving side to check; start-up timed on its own.
    assert ds.manifest.dtype == "float32" and ds.manifest.build["numerics"]["dtype"] == "float32"
    assert {"vllm", "torch", "device"} <= set(ds.manifest.build["numerics"])
    assert summary["stage_s"]["engine_start"] > 0 and summary["stage_s"]["fit"] >= 0
