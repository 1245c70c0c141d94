"""Corpus input for `dresd-build`: loading rows, reading their fields, and the prompt template.

A corpus is a Hugging Face dataset name, a directory written by `Dataset.save_to_disk`, a JSONL
file (optionally gzipped), or one of the public datasets by name (`sharegpt`, `sharegpt:eval`,
`mt-bench`, `humaneval`: `build_tools.public_data`). A field is named by a dotted path, so nested
chat data works directly: `--response-key messages.1.content` reads `row["messages"][1]["content"]`.

The template decides the token sequence a (prompt, response) pair becomes. `chat` renders the
tokenizer's chat template, a user turn then an assistant turn, which is what a chat request to the
server presents; `question-answer` is the paper's `Question: {prompt}\\nAnswer:\\n{response}`; any
other string containing `{prompt}` is used as a plain format string. `generate` and `datastore`
share one `Template`, so the prompt positions of a datastore are exactly the prompts the model
answered.
"""

import gzip
import itertools
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from build_tools import public_data

TEMPLATES = ("chat", "question-answer")
QUESTION_ANSWER = "Question: {prompt}\nAnswer:\n"
_TOKENIZE_BATCH = 1024


class InputError(ValueError):
    """Bad user input (a dataset, a field, a flag); the message says what is wrong and what to do."""


def differences(old: dict[str, Any], new: dict[str, Any], first: Sequence[str] = ()) -> list[str]:
    """`KEY: OLD then, NEW now` for every key whose value differs between two runs' settings, `first` first."""
    keys = [k for k in first if old.get(k) != new.get(k)]
    keys += [k for k in sorted(set(old) | set(new)) if k not in first and old.get(k) != new.get(k)]
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys]


def load_rows(
    dataset: str, split: str = "train", limit: int | None = None, skip: int = 0, reserved_ok: bool = False
) -> list[dict[str, Any]]:
    """Rows of `dataset` (a JSONL(.gz) file, a `save_to_disk` directory, a hub name, or a public dataset's
    name): at most `limit`, after the first `skip` (e.g. those a datastore was built from).

    A public dataset's name carries its split (`split` is not used); the rows reserved for evaluation
    (`sharegpt:eval`) load only with `reserved_ok`, which only evaluation passes, never a build or a sweep.
    """
    path = Path(dataset)
    if not path.exists() and public_data.is_named(dataset):
        if dataset in public_data.RESERVED and not reserved_ok:
            raise InputError(
                f"--dataset {dataset}: reserved for evaluation; build and tune on "
                f"{dataset.partition(':')[0]} (the conversations before them)"
            )
        end = None if limit is None else skip + limit
        try:
            return public_data.load_named(dataset, end)[skip:]
        except public_data.DataError as e:
            raise InputError(str(e)) from e
    if path.is_file() or dataset.endswith((".jsonl", ".jsonl.gz")):
        end = None if limit is None else skip + limit
        return list(itertools.islice(_read_jsonl(path, end), skip, None))
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise InputError(f"{dataset}: no split {split!r}; it has {sorted(loaded)} (pass --split)")
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(dataset, split=split)
        except (ValueError, OSError, ConnectionError) as e:  # unknown split (named), no such dataset, offline
            raise InputError(
                f"--dataset {dataset}: cannot load it ({e}); expected a datasets hub name, "
                "a save_to_disk directory, or a .jsonl/.jsonl.gz file"
            ) from e
    end = len(loaded) if limit is None else min(skip + limit, len(loaded))
    return list(loaded.select(range(min(skip, end), end)))


def _read_jsonl(path: Path, limit: int | None) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        count = 0
        for lineno, raw in enumerate(_lines(f, path), 1):
            if limit is not None and count >= limit:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text ({e}); JSONL files must be UTF-8") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            count += 1
            yield row


def _lines(f: BinaryIO, path: Path) -> Iterator[bytes]:
    """The lines of `f`; InputError naming the file and the last good line if the stream is damaged."""
    lineno = 0
    try:
        for line in f:
            lineno += 1
            yield line
    except (EOFError, OSError, zlib.error) as e:  # gzip: truncated stream, bad CRC, not gzip at all
        raise InputError(
            f"{path}: unreadable after line {lineno} ({e}); the file is truncated or damaged, "
            "re-download or re-write it"
        ) from e


def get_field(row: dict[str, Any], key: str, index: int) -> Any:
    """`row[key]` for a dotted `key` (`messages.1.content`); InputError naming the key and what is there."""
    value: Any = row
    for depth, part in enumerate(key.split(".")):
        where = ".".join(key.split(".")[:depth]) or "the row"
        if isinstance(value, dict):
            if part not in value:
                raise InputError(
                    f"row {index}: no key {part!r} in {where} (looking up {key!r}); keys present: {sorted(value)}"
                )
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            if not -len(value) <= int(part) < len(value):
                raise InputError(f"row {index}: {where} has {len(value)} items, no item {part} (for {key!r})")
            value = value[int(part)]
        else:
            raise InputError(f"row {index}: cannot look up {part!r} in {where} of type {type(value).__name__}")
    return value


def get_text(row: dict[str, Any], key: str, index: int) -> str:
    """The string field `key` of `row`; InputError if it is missing or not a string."""
    value = get_field(row, key, index)
    if not isinstance(value, str):
        raise InputError(f"row {index}: {key!r} is a {type(value).__name__}, expected a string")
    return value


class Template:
    """How a prompt (and its response) become token ids; see the module docstring."""

    def __init__(self, name: str, tokenizer: Any):
        if name not in TEMPLATES and "{prompt}" not in name:
            raise InputError(f"--template {name!r}: expected one of {TEMPLATES} or a format string with {{prompt}}")
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; "
                "pass --template question-answer (the paper's format)"
            )
        self.name = name
        self.tokenizer = tokenizer
        # A chat template writes its own BOS; plain text gets the tokenizer's usual special tokens,
        # as a completion request to vLLM would.
        self.add_special_tokens = name != "chat"

    def prompt_text(self, prompt: str) -> str:
        """The text that asks the model to answer `prompt` (what `generate` sends)."""
        if self.name == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return (QUESTION_ANSWER if self.name == "question-answer" else self.name).replace("{prompt}", prompt)

    def response_text(self, prompt: str, response: str) -> str:
        """What follows the prompt text when `response` answers it (the template's end-of-turn included)."""
        if self.name != "chat":
            return response
        head = self.prompt_text(prompt)
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        # Templates that rewrite earlier turns once an answer follows fall back to the bare response.
        return full[len(head) :] if full.startswith(head) else response

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt's prompt text."""
        return self._tokenize([self.prompt_text(p) for p in prompts])

    def encode_pairs(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        """Token ids of prompt text + response text for each pair.

        The prompt part is tokenized exactly as `generate` and the server tokenize it. The whole text
        tokenized at once is used when it starts with those ids (the natural tokenization, which is
        what the model produced); otherwise, where a token straddles the boundary, the two parts are
        tokenized separately and joined.
        """
        heads = self.encode_prompts(prompts)
        tails = [self.response_text(p, r) for p, r in zip(prompts, responses, strict=True)]
        fulls = self._tokenize([self.prompt_text(p) + t for p, t in zip(prompts, tails, strict=True)])
        out = []
        for head, full, tail in zip(heads, fulls, tails, strict=True):
            if full[: len(head)] == head:
                out.append(full)
            else:
                out.append(head + self.tokenizer(tail, add_special_tokens=False)["input_ids"])
        return out

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"]


@dataclass
class Corpus:
    """Token sequences (prompt + response) of a dataset, flat, with what was dropped or cut."""

    tokens: np.ndarray  # int32 [T]: every sequence, back to back
    lengths: np.ndarray  # int64 [num_sequences]
    rows: int = 0  # rows read
    skipped_empty: int = 0  # rows whose response was empty or only whitespace
    truncated: int = 0  # sequences cut to max_length
    truncated_tokens: int = 0  # tokens cut off

    def sequences(self) -> list[np.ndarray]:
        """Views of the individual sequences."""
        return np.split(self.tokens, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []

    def summary(self) -> dict[str, int]:
        return dict(
            rows=self.rows,
            sequences=len(self.lengths),
            tokens=int(self.lengths.sum()),
            skipped_empty=self.skipped_empty,
            truncated=self.truncated,
            truncated_tokens=self.truncated_tokens,
        )


def encode_corpus(
    rows: list[dict[str, Any]],
    template: Template,
    prompt_key: str | None,
    response_key: str,
    max_length: int,
) -> Corpus:
    """Tokenize every row as template(prompt) + response, cut to `max_length` tokens.

    Without `prompt_key` a row is its response alone. Rows with an empty response are skipped and
    counted: their prompt states are already in the corpus through other rows far more often than
    not, and one bad row should not end a long build. A corpus with nothing left is an error.
    """
    seqs: list[list[int]] = []
    skipped = 0
    with tqdm(total=len(rows), desc="tokenize", unit="row", unit_scale=True) as bar:
        for start in range(0, len(rows), _TOKENIZE_BATCH):
            batch = rows[start : start + _TOKENIZE_BATCH]
            prompts, responses = [], []
            for i, row in enumerate(batch, start):
                response = get_text(row, response_key, i)
                if prompt_key is not None:
                    prompt = get_text(row, prompt_key, i)
                if not response.strip():
                    skipped += 1
                    continue
                responses.append(response)
                if prompt_key is not None:
                    prompts.append(prompt)
            if responses and prompt_key is not None:
                seqs.extend(template.encode_pairs(prompts, responses))
            elif responses:
                seqs.extend(template.tokenizer(responses, add_special_tokens=False)["input_ids"])
            bar.update(len(batch))
    if not seqs:
        raise InputError(
            f"no usable rows: {len(rows)} rows read, {skipped} with an empty {response_key!r}; "
            "check --response-key and the dataset"
        )
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    over = lengths > max_length
    tokens = np.concatenate([np.asarray(s[:max_length], dtype=np.int32) for s in seqs])
    return Corpus(
        tokens=tokens,
        lengths=np.minimum(lengths, max_length),
        rows=len(rows),
        skipped_empty=skipped,
        truncated=int(over.sum()),
        truncated_tokens=int((lengths[over] - max_length).sum()),
    )
