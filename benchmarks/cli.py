"""`dresd-bench`: speculative methods side by side on the same prompts, offline, served, or swept.

    dresd-bench compare    vanilla, ngram, suffix, draft_model, rest and DReSD (one entry per datastore)
                           in one process, with the same prompts, k, max_tokens, batch size and seed
    dresd-bench serve      the same methods behind vLLM's OpenAI server at concurrency 1, 4 and 16
    dresd-bench sweep      DReSD's settings chosen by replay on tuning prompts (a grid of its keys)
    dresd-bench replay     every proposer on recorded greedy trajectories (tokens per step in seconds)
    dresd-bench retrieval  projection + search latency and recall of a datastore, without an LLM

Without --model the embedded default is used: SmolLM2-135M-Instruct, its distilled draft model and
the stdlib corpus's held-out prompts. Exit status: 0 when every method ran and (greedy) matched
vanilla's output, 1 when one did not, 2 on bad input. `dresd-bench COMMAND --help` lists every option.
"""

import argparse
import os
import sys

from build_tools.cli import comma_list, engine_args_type, non_negative_int, positive_int
from build_tools.data import TEMPLATES, InputError, load_rows
from dresd_assets import (
    DEFAULT_DATASET,
    DEFAULT_DRAFT_MODEL,
    DEFAULT_ID_CORPUS,
    ModelMissingError,
    check_default_model,
)

from . import retrieval
from .inputs import KINDS, engine_environment

# Set by dresd-bench itself: the batch size is --batch-size (or the concurrency), the rest per method.
_RESERVED_ENGINE_ARGS = {"model", "speculative_config", "max_num_seqs", "max_model_len", "seed", "disable_log_stats"}


_engine_args = engine_args_type(_RESERVED_ENGINE_ARGS, "are set by dresd-bench (see its own options)")


def _common_options(p: argparse.ArgumentParser, out: str) -> None:
    g = p.add_argument_group("model and methods")
    g.add_argument("--model", help="target model: hub name or path (default: the embedded model)")
    g.add_argument(
        "--methods",
        help=f"comma-separated, from {','.join(KINDS)}; vanilla always runs (the reference). Default: "
        "vanilla,ngram + suffix where arctic-inference is installed + draft_model, rest, dresd where their "
        "--draft-model / --rest-datastore / --datastore is given (the embedded model brings its draft model); "
        "sweep: dresd",
    )
    g.add_argument(
        "--datastore",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="DReSD datastore (dresd-build datastore); repeat for one entry each: --datastore ID=a --datastore OOD=b",
    )
    g.add_argument("--rest-datastore", metavar="FILE", help="REST datastore (dresd-build rest)")
    g.add_argument("--draft-model", help="draft model of draft_model (default with the embedded model: its draft)")
    g.add_argument(
        "--method-config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="extra speculative-config keys for a method kind or entry, e.g. dresd='{\"top_k\": 100}', "
        "dresd-OOD='{\"min_support\": 0.3}', ngram='{\"prompt_lookup_max\": 5}'",
    )

    g = p.add_argument_group("prompts (as in dresd-build)")
    g.add_argument(
        "--dataset", help="datasets hub name, save_to_disk directory or .jsonl(.gz) (default: embedded eval)"
    )
    g.add_argument("--split", default="test", help="split of a hub or save_to_disk dataset (default: test)")
    g.add_argument("--limit", type=positive_int, default=32, help="prompts: the first N rows (default: 32)")
    g.add_argument(
        "--skip", type=non_negative_int, default=0, help="rows to skip before them, e.g. those a datastore answers"
    )
    g.add_argument("--prompt-key", default="instruction", help="field holding the prompt (default: instruction)")
    g.add_argument(
        "--template",
        help=f"{' | '.join(TEMPLATES)} | a format string with {{prompt}} (default: the DReSD datastores' template, "
        "else chat)",
    )

    g = p.add_argument_group("generation (the same for every method)")
    g.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per response (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); lossless is checked then")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (default: 1.0)")
    g.add_argument("--seed", type=int, default=0, help="engine seed; request i samples with seed + i (default: 0)")
    g.add_argument("--max-model-len", type=positive_int, help="default: longest prompt + max tokens + k + 1")
    g.add_argument(
        "--engine-args",
        type=_engine_args,
        default={},
        help='extra vllm.LLM / server arguments as JSON, e.g. \'{"dtype": "bfloat16"}\' (CPU defaults: float32, '
        "enforce_eager, gpu_memory_utilization 0.3)",
    )
    p.add_argument("--out", default=out, help=f"directory for the JSON report and the charts (default: {out})")


def _same_runner_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--same-runner",
        action="store_true",
        help="run every method on vLLM's V1 model runner without async scheduling (VLLM_USE_V2_MODEL_RUNNER=0, "
        "async_scheduling false), the way custom_class methods (dresd, rest) and suffix must run; without it "
        "a GPU build of vLLM runs vanilla, ngram and draft_model on Model Runner V2 with async scheduling. "
        "The report's runner column says what each method used",
    )


def _apply_same_runner(args: argparse.Namespace) -> None:
    if getattr(args, "same_runner", False):
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        args.engine_args = {**args.engine_args, "async_scheduling": False}


def parser() -> argparse.ArgumentParser:
    """The `dresd-bench` argument parser."""
    top = argparse.ArgumentParser(
        prog="dresd-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="every method offline (vllm.LLM), one after the other, in one run")
    _common_options(p, "results/compare")
    p.add_argument("-k", "--num-speculative-tokens", type=positive_int, default=10, help="draft tokens (default: 10)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="requests decoded together (default: 1)")
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="rounds of every method, interleaved (round 1: every method, then round 2, ...); figures are "
        "medians with their (min-max) (default: 3)",
    )
    _same_runner_option(p)

    p = sub.add_parser("serve", help="every method behind vLLM's OpenAI server, under concurrent load")
    _common_options(p, "results/serve")
    p.add_argument("-k", "--num-speculative-tokens", type=positive_int, default=10, help="draft tokens (default: 10)")
    p.add_argument(
        "--concurrency",
        type=comma_list(int),
        default=[1, 4, 16],
        help="concurrent requests per level (default: 1,4,16)",
    )
    p.add_argument(
        "--requests",
        type=positive_int,
        default=32,
        help="requests per level, the prompts in turn (default: 32; at least the concurrency)",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests sent per second, Poisson arrivals as in `vllm bench serve` (default: inf, all at once; "
        "--concurrency still caps those in flight)",
    )
    p.add_argument(
        "--base-url",
        help="measure a server that is already running (e.g. `vllm serve ... --port 8000`: http://127.0.0.1:8000) "
        "instead of starting one per method; --model must name the same model, for its tokenizer",
    )

    p = sub.add_parser(
        "sweep", help="DReSD settings chosen by replay on tuning prompts (a grid of its keys, estimated speed)"
    )
    _common_options(p, "results/sweep")
    _replay_options(p)
    p.set_defaults(methods="dresd")

    p = sub.add_parser(
        "replay", help="every proposer on recorded greedy trajectories, as vLLM's loop would run it (seconds)"
    )
    _common_options(p, "results/replay")
    _replay_options(p)
    p.add_argument(
        "--best-of", action="store_true", help="also the paper's multi-draft bound: the best of the merged survivors"
    )

    retrieval.add_parser(sub)
    return top


def _replay_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--num-speculative-tokens", type=positive_int, default=10, help="draft tokens (default: 10)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="replay every DReSD entry at each value of a speculative-config key (JSON values); repeat for a "
        "grid, e.g. --grid token_cost=0.02,0.04 --grid top_k=10,50. Tune on training prompts, never eval ones",
    )
    p.set_defaults(batch_size=1)


def _apply_defaults(args: argparse.Namespace) -> None:
    # The embedded default comes as a set: target, its draft model, its held-out prompts.
    if args.model is None:
        args.model = check_default_model()  # converted at install time: a missing one names its rebuild
        args.draft_model = args.draft_model or DEFAULT_DRAFT_MODEL
    if args.command == "sweep" and args.dataset is None:
        # Tuning prompts: the training prompts after those the shipped ID corpus answers, never the eval ones.
        args.dataset = DEFAULT_DATASET.train
        args.skip = args.skip or len(load_rows(DEFAULT_ID_CORPUS))
    args.dataset = args.dataset or DEFAULT_DATASET.eval


def _prepare(args: argparse.Namespace, k: int):
    from build_tools.embed import load_tokenizer

    from .inputs import build_methods, load_prompts, make_settings

    _apply_defaults(args)
    _apply_same_runner(args)
    methods = build_methods(args, k)
    prompts = load_prompts(args, methods, load_tokenizer(args.model))
    return methods, make_settings(args, prompts, k), prompts


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dresd-bench` console script; see the module docstring for the exit status."""
    args = parser().parse_args(argv)
    engine_environment(offline=args.command in ("compare", "serve"))
    if args.command == "retrieval":
        return int(retrieval.run(args) or 0)
    try:
        if args.command == "compare":
            from .compare import run_compare

            return run_compare(args, *_prepare(args, args.num_speculative_tokens))
        if args.command == "serve":
            from .serve import run_serve

            args.batch_size = max(args.concurrency)  # the server's max_num_seqs
            return run_serve(args, *_prepare(args, args.num_speculative_tokens))
        if args.command == "replay":
            from .replay import run_replay

            return run_replay(args, *_prepare(args, args.num_speculative_tokens))
        from .sweep import run_sweep

        return run_sweep(args, *_prepare(args, args.num_speculative_tokens))
    except (InputError, ModelMissingError) as e:
        print(f"dresd-bench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
