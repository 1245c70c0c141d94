"""`dresd-build`: make DReSD and REST datastores offline, with vLLM, on one machine or a Ray cluster.

    dresd-build generate   the target model's own responses to a dataset's prompts (in-domain data)
    dresd-build datastore  embed template(prompt) + response with the target model -> DReSD datastore
    dresd-build eval       recall@K against exact search and MRR of a datastore's index
    dresd-build rest       the REST baseline's suffix-array datastore over the same corpus

Without --model/--dataset the embedded default (SmolLM2-135M-Instruct and the stdlib corpus) is used.
`dresd-build COMMAND --help` lists every option.
"""

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from build_tools.data import TEMPLATES, InputError
from dresd_assets import DEFAULT_DATASET, DEFAULT_MODEL, ModelMissingError, check_default_model


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
        # A typo would otherwise surface only after engine start-up, as a TypeError, with files written.
        known = engine_arg_names()
        unknown = sorted(set(value) - known)
        if unknown:
            hints = [f"{k!r}: did you mean {m[0]!r}?" for k in unknown if (m := difflib.get_close_matches(k, known, 1))]
            raise argparse.ArgumentTypeError(
                f"not vllm.LLM arguments: {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
            )
        return value

    return parse


def engine_arg_names() -> set[str]:
    """Every keyword `vllm.LLM` accepts: its own parameters and the fields of `EngineArgs`."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    own = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    return own | {f.name for f in dataclasses.fields(EngineArgs)}


def comma_list(kind: type) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of `kind`, `1,4,16` (the one list style of both CLIs)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {e}") from e
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values

    return parse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    value = int(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


_engine_args = engine_args_type({"max_model_len", "runner", "model"}, "are set by dresd-build (see --max-length)")
# Names of vLLM's dtypes that mean the same torch dtype; the manifest records the torch name.
DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _model_options(p: argparse.ArgumentParser, engine: bool = True) -> None:
    """vLLM's and Hugging Face's names for how the model is loaded; they reach AutoConfig/AutoTokenizer too."""
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (HF, vLLM)")
    p.add_argument("--revision", help="model revision: branch, tag or commit (HF, vLLM)")
    if engine:
        p.add_argument(
            "--dtype",
            default="auto",
            help="dtype the engine runs at, as in `vllm serve --dtype` (float32, bfloat16, float16, auto). Serve at "
            "the same dtype: the manifest records it and the server warns when they differ. auto (default) is "
            "resolved once, to what `vllm serve` picks on this machine, and used by every engine of the build",
        )


def _corpus_options(
    p: argparse.ArgumentParser, response_default: str | None, template: bool = True, recorded: bool = False
) -> None:
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
            default=None if recorded else response_default,
            help="field holding the response, e.g. messages.1.content (default: "
            + ("the key `dresd-build generate` recorded in DATASET.meta.json, else " if recorded else "")
            + f"{response_default})",
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
    _model_options(p)


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
    _corpus_options(p, response_default="response", recorded=True)
    p.add_argument("--n-next", type=positive_int, default=20, help="draft tokens stored per key (paper: 20)")
    p.add_argument("--pca-dim", type=positive_int, default=64, help="key dimensions after PCA (paper: 64)")
    p.add_argument(
        "--pca-sample", type=positive_int, default=100_000, help="states the projection is fitted on (default: 100000)"
    )
    p.add_argument(
        "--index",
        default="auto",
        help="FAISS factory string, or auto: exact Flat up to 50k keys, IVF-SQfp16 up to 2M, IVF-PQ above "
        "(dresd_vllm.index.build.auto_factory)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add this corpus to the datastore at --out, with its projection and trained index (written atomically)",
    )
    p.add_argument(
        "--spool",
        nargs="+",
        metavar="DIR",
        help="with --append: the corpus is what servers verified, spooled to these online_store_path directories "
        "(one per server or replica); their keys and tokens are folded in as they are, without running the model "
        "(--dataset is not read). Chunks folded before are skipped",
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
    _corpus_options(p, response_default="response", template=False, recorded=True)
    p.set_defaults(dataset=None, limit=200)
    p.add_argument("--engine-args", type=_engine_args, default={}, help="extra vllm.LLM arguments as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample (default: 0)")
    _model_options(p)
    p.epilog = "Without --dataset the queries are stored keys; with it, held-out states (first --limit rows, 200)."

    p = sub.add_parser("rest", help="REST baseline datastore (a corpus suffix array) over the same corpus")
    p.add_argument(
        "--model",
        "--tokenizer",
        dest="model",
        default=DEFAULT_MODEL,
        help="target model (hub name or path) whose tokenizer cuts the corpus (default: embedded)",
    )
    p.add_argument("--out", required=True, help="REST datastore file to write (.npz)")
    _corpus_options(p, response_default="response", recorded=True)
    p.set_defaults(prompt_key=None)
    p.add_argument("--overwrite", action="store_true", help="replace OUT")
    _model_options(p, engine=False)
    p.epilog = "With --prompt-key a row is template(prompt) + response, exactly as `datastore` embeds it."
    return top


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed arguments, with `use_ray` set when the command runs on Ray, `hf` the AutoConfig/AutoTokenizer
    options (trust_remote_code, revision), which also go into `engine_args` with an explicit `dtype`, and
    `response_key` read from the `.meta.json` of a file `dresd-build generate` wrote, when not given."""
    args = parser().parse_args(argv)
    args.use_ray = bool(getattr(args, "ray", False) or getattr(args, "ray_address", None))
    engine = getattr(args, "engine_args", {})
    # The flags, or the same keys inside --engine-args (vLLM's names), reach vLLM and Hugging Face alike.
    args.hf = {k: engine[k] for k in ("trust_remote_code", "revision") if engine.get(k) is not None}
    if args.trust_remote_code:
        args.hf["trust_remote_code"] = True
    if args.revision:
        args.hf["revision"] = args.revision
    if hasattr(args, "engine_args"):
        args.engine_args = {**engine, **args.hf}
        dtype = args.dtype if args.dtype != "auto" else engine.get("dtype", "auto")
        args.engine_args.pop("dtype", None)
        if dtype != "auto":
            args.engine_args["dtype"] = DTYPE_ALIASES.get(dtype, dtype)
    if getattr(args, "response_key", "") is None:
        args.response_key = generated_response_key(args.dataset) or "response"
    return args


def generated_response_key(dataset: str | None) -> str | None:
    """The response key `dresd-build generate` recorded for `dataset` (its `.meta.json`), if it wrote it."""
    if not dataset:
        return None
    meta = Path(f"{dataset}.meta.json")
    try:
        key = json.loads(meta.read_text()).get("response_key")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(key, str):
        print(f"--response-key {key} (what `dresd-build generate` recorded in {meta})", file=sys.stderr)
        return key
    return None


def resolve_dtype(args: argparse.Namespace) -> None:
    """Turn `--dtype auto` into the dtype `vllm serve` picks for the model here, and pin it in `engine_args`.

    vLLM resolves auto per runner: a float32 checkpoint becomes bfloat16 for generation but float16 for
    the pooling runner the embedding stage uses, on this CPU. One explicit dtype for every engine keeps
    `generate`'s answers, the keys and the served model at the same numerics.
    """
    if "dtype" in args.engine_args:
        return
    from vllm.config import ModelConfig

    try:
        config = ModelConfig(model=args.model, dtype="auto", **args.hf)
    except Exception as e:  # vLLM raises several types for an unreadable model
        raise InputError(f"--model {args.model!r}: cannot resolve --dtype auto ({type(e).__name__}: {e})") from e
    args.engine_args["dtype"] = str(config.dtype).removeprefix("torch.")
    print(f"--dtype auto: {args.engine_args['dtype']} (what `vllm serve` picks here)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dresd-build` console script; 2 on bad input, with the reason on stderr."""
    args = parse_args(argv)
    started_ray = False
    try:
        if args.use_ray:
            from build_tools.ray_jobs import connect

            started_ray = connect(args.ray_address)
        if DEFAULT_MODEL == getattr(args, "model", None):
            check_default_model()  # converted at install time: say how to rebuild it, not vLLM's hub error
        if args.command in ("generate", "datastore"):
            resolve_dtype(args)
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
