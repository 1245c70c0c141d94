"""Hidden states of the target model at every position, computed by vLLM itself.

vLLM's pooling runner with the token-level task `token_embed`, `ALL` pooling and the activation
(L2 normalisation) switched off returns, for every prompt token, the model's post-norm last-layer
hidden state: the tensor `compute_logits` takes when the model generates, and so the state the
proposer captures while serving. The build therefore runs at serving speed on the serving stack.
Token-level pooling requests skip the prefix cache, so shared prompt prefixes never lose states.

The build cuts the corpus into shards of whole sequences; `EmbedWorker` turns one shard into
projected keys (or raw states, for fitting the projection). The same class runs in-process and as
a Ray Data actor, so a Ray build computes exactly what a single-process build does.
"""

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from build_tools.data import InputError
from build_tools.engine import close_llm, make_llm
from dresd_vllm.store.projection import Projection


@dataclass(frozen=True)
class ModelInfo:
    """What a datastore records about its model, read without loading the weights."""

    hidden_size: int
    vocab_size: int
    max_positions: int | None


def model_info(model: str, **hf: Any) -> ModelInfo:
    """Hidden size, vocabulary size and context length from the model's config.

    `hf`: `trust_remote_code` / `revision`, as given to vLLM (`dresd-build --trust-remote-code --revision`).
    """
    from transformers import AutoConfig

    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise InputError(f"--model {model}: no such directory (pass a hub name or a checkpoint directory)")
    try:
        config = AutoConfig.from_pretrained(model, **hf).get_text_config()
    except (OSError, ValueError) as e:
        raise InputError(f"--model {model!r}: cannot read its config ({e})") from e
    return ModelInfo(config.hidden_size, config.vocab_size, getattr(config, "max_position_embeddings", None))


def load_tokenizer(model: str, **hf: Any) -> Any:
    """The model's Hugging Face tokenizer (the one vLLM loads for it); `hf` as in `model_info`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, **hf)
    except (OSError, ValueError) as e:
        raise InputError(f"{model!r}: cannot load its tokenizer ({e})") from e


def check_length(model: str, max_length: int, **hf: Any) -> None:
    """Refuse a --max-length the model cannot attend over; `hf` as in `model_info`."""
    limit = model_info(model, **hf).max_positions
    if limit is not None and max_length > limit:
        raise InputError(f"--max-length {max_length} exceeds the context of {model!r} ({limit} positions)")


def first_result(bar: Any, desc: str, seconds: float) -> float:
    """A stage's first result is in: name its bar `desc` (it said "starting engine" until now) and time it
    from its first token, `seconds` (that shard's own time on the engine) ago. Returns the seconds spent
    before that (engine or Ray worker start-up), which the stage's own time leaves out."""
    now = time.time()
    startup = max(0.0, now - bar.start_t - seconds)
    bar.set_description(desc)
    bar.start_t = now - seconds
    return startup


def plan_shards(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Cut sequences `0..len(lengths)` into contiguous ranges of about `shard_tokens` tokens each.

    Depends only on the lengths, so every run over the same corpus plans the same shards: that is
    what lets a rerun reuse finished shards and a Ray build match a single-process one.
    """
    shards, start, tokens = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        tokens += n
        if tokens >= shard_tokens:
            shards.append((start, i + 1))
            start, tokens = i + 1, 0
    if start < len(lengths):
        shards.append((start, len(lengths)))
    return shards


def shard_task(shard: int, tokens: np.ndarray, lengths: np.ndarray, **extra: Any) -> dict[str, Any]:
    """One unit of work: the shard's id and its sequences as bytes (what Ray Data ships to a worker).

    `extra`: more fields a worker needs (generate's first row number, for per-prompt seeds).
    """
    return {
        "shard": shard,
        "tokens": tokens.astype(np.int32).tobytes(),
        "lengths": lengths.astype(np.int64).tobytes(),
        **extra,
    }


def task_sequences(task: dict[str, Any]) -> list[list[int]]:
    """The token sequences of a task made by `shard_task`."""
    tokens = np.frombuffer(task["tokens"], dtype=np.int32)
    lengths = np.frombuffer(task["lengths"], dtype=np.int64)
    return [s.tolist() for s in np.split(tokens, np.cumsum(lengths)[:-1])] if len(lengths) else []


def unbatch(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a Ray Data numpy batch (a dict of columns)."""
    columns = list(batch)
    return [dict(zip(columns, values, strict=True)) for values in zip(*(batch[c] for c in columns), strict=True)]


class EmbedWorker:
    """Embeds shards with one vLLM pooling engine; a callable class, as Ray Data's `map_batches` wants.

    With a projection each shard becomes fp16 keys `[positions, pca_dim]`; without one, fp32 states
    `[positions, hidden_size]` (the sample the projection is fitted on).
    """

    def __init__(self, model: str, max_length: int, engine_args: dict[str, Any], projection: Projection | None = None):
        self.llm = make_llm(model, max_length, engine_args, pooling=True)
        self.projection = projection

    def states(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Post-norm last-layer hidden state at every position of every sequence, fp32 on the CPU."""
        outputs = self.llm.encode([{"prompt_token_ids": s} for s in seqs], pooling_task="token_embed", use_tqdm=False)
        return [o.outputs.data.float().cpu() for o in outputs]

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Map a batch of shard tasks to `{"shard", "positions", "data", "seconds", "worker"}`.

        `data` is the array's bytes; `seconds` the time this shard took here, and `worker` this process
        (host:pid), so a caller can tell engine time from start-up and scheduling time.
        """
        out: dict[str, list] = {"shard": [], "positions": [], "data": [], "seconds": [], "worker": []}
        for task in unbatch(batch):
            start = time.perf_counter()
            states = torch.cat(self.states(task_sequences(task)))
            data = self.projection(states).numpy() if self.projection is not None else states.numpy()
            out["shard"].append(int(task["shard"]))
            out["positions"].append(len(states))
            out["data"].append(data.tobytes())
            out["seconds"].append(time.perf_counter() - start)
            out["worker"].append(f"{socket.gethostname()}:{os.getpid()}")
        return out

    def close(self) -> None:
        close_llm(self.llm)
