"""`dresd-build`: make DReSD and REST datastores offline, with vLLM, on one machine or a Ray cluster.

    dresd-build generate   the target model's own responses to a dataset's prompts (in-domain data)
    dresd-build datastore  embed template(prompt) + response with the target model -> DReSD datastore
    dresd-build eval       recall@K against exact search and MRR of a datastore's index
    dresd-build rest       the REST baseline's suffix-array datastore over the same corpus

Without --model/--dataset the embedded default (SmolLM2-135M-Instruct and the stdlib corpus) is used.
`dresd-build COMMAND --help` lists every option.
"""

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from build_tools.data import TEMPLATES, InputError
from dresd_vllm.assets import DEFAULT_DATASET, DEFAULT_MODEL, ModelMissingError, check_default_model


def engine_args_type(reserved: set[str], why: str) -> Callable[[str], dict[str, Any]]:
    """An argparse type: a JSON object of `vllm.LLM` keyword arguments, none of them in `reserved`."""

    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("expected a JSON object of vllm.LLM keyword arguments")
        taken = sorted(reserved & set(value))
        if taken:
            raise argparse.ArgumentTypeError(f"{taken} {why}")
        return value

    return parse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_engine_args = engine_args_type({"max_model_len", "runner", "model"}, "are set by dresd-build (see --max-length)")


def _corpus_options(p: argparse.ArgumentParser, response_default: str | None, template: bool = True) -> None:
    p.add_argument(
        "--dataset",
        default=DEFAULT_DATASET.train,
        help="datasets hub name, save_to_disk directory, or .jsonl/.jsonl.gz file (default: embedded)",
    )
    p.add_argument("--split", default="train", help="split of a hub or save_to_disk dataset (default: train)")
    p.add_argument("--limit", type=positive_int, help="use only the first N rows")
    p.add_argument(
        "--prompt-key",
        default="instruction",
        help="field holding the prompt; dotted paths reach nested fields (default: instruction)",
    )
    if response_default is not None:
        p.add_argument(
            "--response-key",
            default=response_default,
            help=f"field holding the response, e.g. messages.1.content (default: {response_default})",
        )
    if template:
        p.add_argument(
            "--template",
            default="chat",
            help=f"{' | '.join(TEMPLATES)} | a format string with {{prompt}}: how a prompt is "
            "presented to the model (default: chat, the tokenizer's chat template)",
        )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=1024,
        help="tokens per sequence (prompt + response); longer ones are cut, and in generate a prompt "
        "that leaves no room for a response gets an empty one (default: 1024)",
    )


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine-args",
        type=_engine_args,
        default={},
        help='extra vllm.LLM arguments as JSON, e.g. \'{"dtype": "bfloat16", "tensor_parallel_size": 2}\' '
        "(on the CPU kv_cache_memory_bytes defaults to 1 GiB unless VLLM_CPU_KVCACHE_SPACE is set)",
    )
    ray = p.add_mutually_exclusive_group()
    ray.add_argument("--ray", action="store_true", help="run on a local Ray cluster (or the one RAY_ADDRESS names)")
    ray.add_argument("--ray-address", help="run on the Ray cluster at ADDR (e.g. ray://head:10001, auto)")
    p.add_argument(
        "--ray-workers",
        type=positive_int,
        help="vLLM engines (Ray actors); default: one per GPU, or one per CPU without GPUs",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT, or discard a partial run that differs")


def parser() -> argparse.ArgumentParser:
    """The `dresd-build` argument parser."""
    top = argparse.ArgumentParser(
        prog="dresd-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="the target model's responses to the prompts (in-domain data)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model: hub name or path (default: embedded)")
    p.add_argument("--out", required=True, help="JSONL file: every input row plus the response")
    _corpus_options(p, response_default="output")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per response (default: 128)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 is greedy (default); the paper's nucleus option is 0.7 with --top-p 0.95",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=1024,
        help="prompts per shard: the unit of work, of a Ray task and of resuming (default: 1024)",
    )
    _engine_options(p)

    p = sub.add_parser("datastore", help="embed the corpus with the target model and write a DReSD datastore")
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model: hub name or path (default: embedded)")
    p.add_argument("--out", required=True, help="datastore directory to write")
    _corpus_options(p, response_default="response")
    p.add_argument("--n-next", type=positive_int, default=20, help="draft tokens stored per key (paper: 20)")
    p.add_argument("--pca-dim", type=positive_int, default=64, help="key dimensions after PCA (paper: 64)")
    p.add_argument(
        "--pca-sample", type=positive_int, default=100_000, help="states the projection is fitted on (default: 100000)"
    )
    p.add_argument(
        "--index",
        default="auto",
        help="FAISS factory string, or auto: exact Flat for small stores, IVF above (dresd_vllm.index.auto_factory)",
    )
    p.add_argument(
        "--shard-tokens",
        type=positive_int,
        default=262_144,
        help="tokens per embedding shard: the unit of a Ray task and of resuming (default: 262144)",
    )
    _engine_options(p)

    p = sub.add_parser("eval", help="recall@K vs exact search and MRR of a datastore's index")
    p.add_argument("datastore", help="datastore directory")
    p.add_argument("--k", type=positive_int, default=50, help="neighbours compared (default: 50, the serving top-k)")
    p.add_argument("--queries", type=positive_int, default=1000, help="queries (default: 1000)")
    p.add_argument("--model", help="model for held-out queries (default: the datastore's)")
    _corpus_options(p, response_default="response", template=False)
    p.set_defaults(dataset=None, limit=200)
    p.add_argument("--engine-args", type=_engine_args, default={}, help="extra vllm.LLM arguments as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample (default: 0)")
    p.epilog = "Without --dataset the queries are stored keys; with it, held-out states (first --limit rows, 200)."

    p = sub.add_parser("rest", help="REST baseline datastore (a corpus suffix array) over the same corpus")
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="tokenizer (the target model's; default: embedded)")
    p.add_argument("--out", required=True, help="REST datastore file to write (.npz)")
    _corpus_options(p, response_default="response")
    p.set_defaults(prompt_key=None)
    p.add_argument("--overwrite", action="store_true", help="replace OUT")
    p.epilog = "With --prompt-key a row is template(prompt) + response, exactly as `datastore` embeds it."
    return top


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed arguments, with `use_ray` set when the command runs on Ray."""
    args = parser().parse_args(argv)
    args.use_ray = bool(getattr(args, "ray", False) or getattr(args, "ray_address", None))
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dresd-build` console script; 2 on bad input, with the reason on stderr."""
    args = parse_args(argv)
    started_ray = False
    try:
        if args.use_ray:
            from build_tools.ray_jobs import connect

            started_ray = connect(args.ray_address)
        if DEFAULT_MODEL in (getattr(args, "model", None), getattr(args, "tokenizer", None)):
            check_default_model()  # converted at install time: say how to rebuild it, not vLLM's hub error
        if args.command == "generate":
            from build_tools.generate import run_generate

            run_generate(args)
        elif args.command == "datastore":
            from build_tools.build import run_datastore

            run_datastore(args)
        elif args.command == "eval":
            from build_tools.evaluate import run_eval

            run_eval(args)
        else:
            from build_tools.rest import run_rest

            run_rest(args)
    except (InputError, ModelMissingError) as e:
        print(f"dresd-build {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
