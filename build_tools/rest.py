"""`dresd-build rest`: the REST baseline's datastore, a suffix array over the same corpus.

REST (He et al. 2024) drafts by exact suffix match in a corpus; `dresd_vllm.rest.suffix_array` holds the
corpus as one token stream with its suffix array (PyPI's `draftretriever` is ADED's fork, whose
search is not REST's; see that module).
With --prompt-key every row becomes exactly the token sequence `dresd-build datastore` embeds
(template(prompt) + response, cut to --max-length), so the two methods see the same data; without
it a row is its response alone, as REST's own `get_datastore_chat.py` writes it.
"""

import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from build_tools.data import InputError, Template, encode_corpus, load_rows
from build_tools.embed import load_tokenizer
from dresd_vllm.rest.suffix_array import write_rest_datastore
from dresd_vllm.store.manifest import tokenizer_fingerprint


def run_rest(args: Namespace) -> dict[str, Any]:
    """The `rest` command: write the suffix-array index file `args.out`; returns the summary."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {out}: exists; pass --overwrite to replace it")
    tokenizer = load_tokenizer(args.model, **args.hf)
    start = time.perf_counter()
    rows = load_rows(args.dataset, args.split, args.limit)
    template = Template(args.template, tokenizer)
    corpus = encode_corpus(rows, template, args.prompt_key, args.response_key, args.max_length)
    metadata = dict(
        tokenizer=args.model,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        template=args.template,
    )
    write_rest_datastore(out, corpus.sequences(), metadata)
    secs = time.perf_counter() - start
    summary = dict(out=str(out), **corpus.summary(), bytes=out.stat().st_size, seconds=secs)
    print(
        f"\nREST datastore {out}: {summary['sequences']:,} sequences, {summary['tokens']:,} tokens, "
        f"{summary['bytes'] / 2**20:.1f} MiB in {secs:.1f} s"
    )
    if corpus.skipped_empty or corpus.truncated:
        print(f"  skipped {corpus.skipped_empty:,} empty responses; truncated {corpus.truncated:,} sequences")
    return summary
