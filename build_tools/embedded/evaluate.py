"""Greedy-decode held-out prompts with vLLM and report how much of the output is valid Python.

    python -m build_tools.embedded.evaluate [--model PATH] [--prompts 100] [--max-tokens 256]

The prompts are spread evenly over the evaluation part of the embedded corpus (which is sorted
by module), so every held-out package contributes. An output counts as Python when `ast.parse`
accepts it; an output cut off by `--max-tokens` usually does not.
"""

import argparse
import ast
import json
import os
import time

from dresd_assets import DEFAULT_DATASET, TINY_MODEL


def parses(text: str) -> bool:
    """Whether `text` is syntactically valid Python."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--show", type=int, default=2, help="print this many outputs")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    rows = DEFAULT_DATASET.rows("eval")
    rows = rows[:: max(1, len(rows) // args.prompts)][: args.prompts]
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.3, seed=0)
    start = time.time()
    outputs = llm.chat(
        [[{"role": "user", "content": r["instruction"]}] for r in rows],
        SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
        use_tqdm=False,
    )
    seconds = time.time() - start
    texts = [o.outputs[0].text for o in outputs]
    for row, text in list(zip(rows, texts, strict=True))[: args.show]:
        print(f"--- {row['module']}.{row['qualname']}\n{text}\n")
    report = {
        "model": args.model,
        "prompts": len(rows),
        "max_tokens": args.max_tokens,
        "parse_share": sum(map(parses, texts)) / len(texts),
        "finished_share": sum(o.outputs[0].finish_reason == "stop" for o in outputs) / len(outputs),
        "exact_share": sum(t.strip() == r["response"].strip() for t, r in zip(texts, rows, strict=True)) / len(rows),
        "mean_output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs) / len(outputs),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
