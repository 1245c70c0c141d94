"""`dresd-build eval`: how well a datastore's index finds what exact search finds.

recall@K compares the index's top K with exact inner-product search over the stored keys; MRR
queries the index with stored keys and ranks each key's own id (the paper's `index.py` check).
Queries are a seeded sample of stored keys, or, with --dataset, the projected states of held-out
text embedded by the datastore's model: the states the proposer will search with.
"""

import json
from argparse import Namespace
from typing import Any

import numpy as np
import torch

from build_tools.data import Template, encode_corpus, load_rows
from build_tools.embed import EmbedWorker, load_tokenizer, model_info, shard_task
from build_tools.index_metrics import recall_at_k, self_retrieval_mrr
from build_tools.ray_jobs import ShardRunner
from dresd_vllm.index.build import read_keys
from dresd_vllm.index.search import SearchOptions
from dresd_vllm.store.datastore import Datastore
from dresd_vllm.store.manifest import DatastoreError, tokenizer_fingerprint


def held_out_queries(args: Namespace, ds: Datastore) -> np.ndarray:
    """Projected states at `args.queries` random positions of `args.dataset`, embedded with vLLM."""
    m = ds.manifest
    model = args.model or m.model
    tokenizer = load_tokenizer(model, **args.hf)
    info = model_info(model, **args.hf)
    ds.check_model(
        hidden_size=info.hidden_size, vocab_size=info.vocab_size, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)
    )
    template = Template(m.template, tokenizer)
    rows = load_rows(args.dataset, args.split, args.limit)
    corpus = encode_corpus(rows, template, args.prompt_key, args.response_key, args.max_length)
    # Held-out states at the dtype the keys were embedded at, unless --dtype says otherwise.
    engine_args = {"dtype": m.dtype, **args.engine_args} if m.dtype else args.engine_args
    worker_kwargs = dict(model=model, max_length=args.max_length, engine_args=engine_args, projection=ds.projection)
    runner = ShardRunner(EmbedWorker, worker_kwargs, use_ray=False)
    try:
        (result,) = runner.run([shard_task(0, corpus.tokens, corpus.lengths)])
    finally:
        runner.close()
    keys = np.frombuffer(result["data"], dtype=np.float16).reshape(-1, m.pca_dim)
    rng = np.random.default_rng(args.seed)
    return keys[np.sort(rng.choice(len(keys), size=min(args.queries, len(keys)), replace=False))]


def run_eval(args: Namespace) -> dict[str, Any]:
    """The `eval` command; prints and returns recall@K and MRR."""
    try:
        ds = Datastore.load(args.datastore, SearchOptions(backend="faiss"))
    except DatastoreError as e:
        raise SystemExit(f"dresd-build eval: {e}") from e
    keys = read_keys(ds.index.index).numpy()  # decoded, so approximate for PQ indexes
    if args.dataset:
        queries, source = held_out_queries(args, ds), f"held-out states of {args.dataset}"
    else:
        rng = np.random.default_rng(args.seed)
        rows = np.sort(rng.choice(len(keys), size=min(args.queries, len(keys)), replace=False))
        queries, source = keys[rows], "stored keys"
    k = min(args.k, len(keys))
    result = dict(
        datastore=str(args.datastore),
        index=ds.manifest.index_factory,
        nprobe=ds.index.nprobe,
        keys=len(keys),
        queries=len(queries),
        query_source=source,
        k=k,
        recall_at_k=recall_at_k(ds.index, keys, torch.from_numpy(np.asarray(queries)), k),
        mrr=self_retrieval_mrr(ds.index, keys, k, sample_size=args.queries, seed=args.seed),
    )
    print(json.dumps(result, indent=2))
    return result
