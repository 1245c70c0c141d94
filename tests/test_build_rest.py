"""`dresd-build rest`: REST's suffix array is built over exactly the sequences the DReSD datastore embeds."""

import numpy as np
from conftest import BUILD_MAX_LENGTH, build_args
from transformers import AutoTokenizer

from build_tools.build import read_corpus
from build_tools.cli import main, parse_args
from dresd_vllm.rest.suffix_array import SEPARATOR, SuffixArrayStore


def test_rest_datastore_holds_the_datastore_sequences(tiny_model, build_corpus, tmp_path, capsys):
    out = tmp_path / "rest.npz"
    argv = ["rest", "--tokenizer", tiny_model, "--dataset", str(build_corpus), "--out", str(out),
            "--prompt-key", "instruction", "--max-length", str(BUILD_MAX_LENGTH)]  # fmt: skip
    assert main(argv) == 0
    corpus = read_corpus(
        parse_args(build_args(tiny_model, build_corpus, tmp_path / "ds")), AutoTokenizer.from_pretrained(tiny_model)
    )
    with np.load(out) as z:
        tokens = z["tokens"]
    expected = np.concatenate([np.append(s, SEPARATOR) for s in corpus.sequences()])
    assert np.array_equal(tokens, expected)
    seq = corpus.sequences()[4].tolist()
    assert SuffixArrayStore(out).draft(np.array(seq[:50]), max_len=5, min_support=0.0) == seq[50:55]

    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
