"""Train the embedded models on the CPU, seeded.

The tiny target trains a byte-level BPE tokenizer on the corpus's training part first; the tiny draft
reuses the target's tokenizer, so vLLM's `draft_model` baseline can pair them:

    python -m build_tools.embedded.train --preset target                 # ~40 min, 1 thread
    python -m build_tools.embedded.train --preset draft                  # ~10 min

The draft of SmolLM2 (the default model) is distilled from SmolLM2 itself: it is trained on the ID
corpus, SmolLM2's own greedy answers (sequence-level distillation), on SmolLM2's tokenizer with tied
embeddings initialised from SmolLM2's, projected onto their top principal directions:

    python -m build_tools.embedded.train --preset smollm2-draft          # ~26 min, 1 thread

Each example is the chat-formatted pair `<|user|>\\n{instruction}</s>\\n<|assistant|>\\n{response}</s>`
and the loss covers the response and its closing EOS only: the model is only ever asked to write
responses, and the instructions are templated text that would spend capacity without helping.
Training state is saved every `--save-every` steps under `--work` and `--resume` continues from it
(same batches, same result). The shipped checkpoint is fp16 safetensors, evaluated as loaded.
"""

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from build_tools.tiny_model import make_llama, save_checkpoint, train_tokenizer
from dresd_assets import (
    DEFAULT_DATASET,
    DEFAULT_DRAFT_MODEL,
    DEFAULT_ID_CORPUS,
    DEFAULT_MODEL,
    TINY_DRAFT_MODEL,
    TINY_MODEL,
    check_default_model,
)

REPO = Path(__file__).resolve().parents[2]
# Sizes and epochs: the target fills ~40 minutes of one core, the draft ~10 (tok/s measured here).
# smollm2-draft: hidden 192 keeps the tied 49,152 x 192 embedding (most of the model) at 18 MB in fp16;
# its 2 epochs (118 steps) took 26 minutes of one heavily shared core on the shipped 600-prompt ID corpus.
PRESETS = {
    "target": dict(out=TINY_MODEL, hidden=256, layers=4, heads=4, intermediate=688, epochs=4.5),
    "draft": dict(out=TINY_DRAFT_MODEL, hidden=128, layers=2, heads=4, intermediate=344, epochs=2.5),
    "smollm2-draft": dict(out=DEFAULT_DRAFT_MODEL, hidden=192, layers=4, heads=3, intermediate=512, epochs=2.0),
}
# Smaller batches for the small ID corpus (~100k tokens an epoch), so it still takes a few hundred steps.
TRAINING = {"smollm2-draft": dict(batch_tokens=2048, warmup=20, eval_every=25)}
# The ID corpus's answers were generated with at most this many tokens: one that long was cut, not finished.
ID_MAX_TOKENS = 128
ID_HELD_OUT = 0.05  # the last rows of the ID corpus (the last modules, alphabetically) are the draft's eval set


def encode(tokenizer: PreTrainedTokenizerFast, row: dict, response_key: str = "response") -> tuple[list[int], int]:
    """Token ids of one chat-formatted pair and the number of prompt tokens (which get no loss).

    The prompt is the chat template with a generation prompt, exactly what vLLM sends; the response
    ends at EOS, where vLLM stops (the template's newline after it is never generated). A generated
    answer cut at ID_MAX_TOKENS gets no EOS: the model did not stop there.
    """
    messages = [{"role": "user", "content": row["instruction"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(row[response_key], add_special_tokens=False).input_ids
    finished = response_key == "response" or len(response_ids) < ID_MAX_TOKENS
    return prompt_ids + response_ids + [tokenizer.eos_token_id] * finished, len(prompt_ids)


def read_id_corpus(path: str) -> list[dict]:
    """Rows of a `dresd-build generate` JSONL(.gz) file with a non-empty `output`."""
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["output"]]


def teacher_embeddings(hidden: int) -> torch.Tensor:
    """SmolLM2's input embedding projected onto its `hidden` top principal directions, rescaled: a draft
    that starts from the teacher's token geometry instead of random vectors."""
    from safetensors import safe_open

    with safe_open(str(Path(check_default_model()) / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight").float()
    _, _, v = torch.linalg.svd(embedding - embedding.mean(0), full_matrices=False)
    projected = embedding @ v[:hidden].T
    # The init's scale (std 0.02), not the teacher's: tied to the LM head, the teacher's norms would
    # start the draft at logits far too large (a loss of 35 nats instead of ln(vocab) = 10.8).
    return projected * (0.02 / projected.std())


def make_batches(examples: list[tuple[list[int], int]], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that batch * longest <= batch_tokens: little padding is wasted."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(examples[i][0]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current]


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and labels (-100 on prompts and padding).

    No attention mask is needed: under causal attention a real token never sees the padding
    that follows it, so the loss is exactly that of each sequence alone.
    """
    width = max(len(ids) for ids, _ in examples)
    inputs = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    for row, (ids, n_prompt) in enumerate(examples):
        inputs[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return inputs, labels


def loss_sums(model: LlamaForCausalLM, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count."""
    logits = model(input_ids=inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return loss, int((targets != -100).sum())


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, examples: list, pad_id: int, bf16: bool, batch_tokens: int) -> float:
    """Mean per-token loss (nats) on the response tokens of `examples`."""
    model.eval()
    total, count = 0.0, 0
    for batch in make_batches(examples, batch_tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = loss_sums(model, *collate([examples[i] for i in batch], pad_id))
        total, count = total + loss.item(), count + n
    model.train()
    return total / count


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, required=True)
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "embedded", help="resumable state, logs")
    parser.add_argument("--tokenizer", type=Path, help="reuse this tokenizer (draft default: the target's)")
    parser.add_argument("--id-corpus", default=DEFAULT_ID_CORPUS, help="smollm2-draft's data (default: shipped)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--epochs", type=float, help="override the preset's")
    parser.add_argument("--max-steps", type=int, help="stop early (smoke runs)")
    parser.add_argument("--max-len", type=int, default=512, help="longer examples are dropped")
    parser.add_argument("--batch-tokens", type=int, help="tokens per batch (default: 8192; smollm2-draft: 2048)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: 50; smollm2-draft: 20)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default: 200; smollm2-draft: 25)")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    for key, value in {"batch_tokens": 8192, "warmup": 50, "eval_every": 200, **TRAINING.get(args.preset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = args.out or Path(preset["out"])
    work = args.work / args.preset
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    distill = args.preset == "smollm2-draft"
    if distill:
        rows = read_id_corpus(args.id_corpus)
        split = len(rows) - max(1, round(ID_HELD_OUT * len(rows)))
        train_rows, eval_rows, response_key = rows[:split], rows[split:], "output"
    else:
        train_rows, eval_rows = DEFAULT_DATASET.rows("train"), DEFAULT_DATASET.rows("eval")
        response_key = "response"
    tokenizer_dir = args.tokenizer or {"draft": TINY_MODEL, "smollm2-draft": DEFAULT_MODEL}.get(args.preset)
    if tokenizer_dir:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer((r["instruction"] + "\n" + r["response"] for r in train_rows), args.vocab_size)
    encoded = [encode(tokenizer, r, response_key) for r in tqdm(train_rows, desc="tokenize", unit="pair")]
    train = [e for e in encoded if len(e[0]) <= args.max_len]
    held_out = [e for e in (encode(tokenizer, r, response_key) for r in eval_rows) if len(e[0]) <= args.max_len]
    batches = make_batches(train, args.batch_tokens)
    epochs = args.epochs or preset["epochs"]
    total_steps = math.ceil(epochs * len(batches))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    print(
        f"{len(train)} train examples ({len(encoded) - len(train)} over {args.max_len} tokens dropped), "
        f"{sum(len(e[0]) for e in train)} tokens, {len(batches)} batches/epoch, {total_steps} steps; "
        f"{len(held_out)} eval examples"
    )

    model = make_llama(
        tokenizer, preset["hidden"], preset["layers"], preset["heads"], preset["intermediate"],
        max_position_embeddings=8192 if distill else 1024, seed=args.seed, tie_word_embeddings=True,
    )
    if distill:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(teacher_embeddings(preset["hidden"]))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    state_path, log_path = work / "state.pt", work / "log.jsonl"
    step, elapsed = 0, 0.0
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {step}")
    elif log_path.exists():
        log_path.unlink()

    def epoch_order(epoch: int) -> list[int]:
        # The batch order of an epoch depends on the seed and epoch only, so a resumed run sees
        # the same batches as an uninterrupted one.
        return torch.randperm(len(batches), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()

    model.train()
    start = time.time() - elapsed
    bar = tqdm(total=total_steps, initial=step, desc=f"train {args.preset}", unit="step")
    while step < total_steps:
        batch = batches[epoch_order(step // len(batches))[step % len(batches)]]
        inputs, labels = collate([train[i] for i in batch], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss_sum, n = loss_sums(model, inputs, labels)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": round(loss_sum.item() / n, 4), "seconds": round(time.time() - start, 1)}
        if step % args.eval_every == 0 or step == total_steps:
            record["eval_loss"] = round(evaluate(model, held_out, tokenizer.pad_token_id, args.bf16, 8192), 4)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update()
        bar.set_postfix(loss=record["loss"], **({"eval": record["eval_loss"]} if "eval_loss" in record else {}))
        if step % args.save_every == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "elapsed": time.time() - start}
            torch.save(state, work / "state.tmp")
            (work / "state.tmp").replace(state_path)  # atomic: a crash mid-save keeps the last state
    bar.close()
    train_seconds = time.time() - start

    # Ship fp16 (a few MB) and report the loss of exactly what ships, computed in fp32.
    model = model.to(torch.float16)
    if distill:
        # vLLM's draft_model reads the target's tokenizer: SmolLM2's (3.5 MB) is not copied here.
        model.save_pretrained(out, safe_serialization=True)
        model.generation_config.save_pretrained(out)
    else:
        save_checkpoint(model, tokenizer, out)
    shipped = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    eval_loss = evaluate(shipped, held_out, tokenizer.pad_token_id, False, 8192)
    summary = {
        "preset": args.preset, "name": out.name, **{k: v for k, v in preset.items() if k != "out"},
        "data": os.path.relpath(args.id_corpus if distill else DEFAULT_DATASET.train, REPO),
        "epochs": epochs, "steps": total_steps,
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "train_examples": len(train), "train_tokens_per_epoch": sum(len(e[0]) for e in train),
        "eval_examples": len(held_out), "eval_loss_response_tokens": round(eval_loss, 4),
        "train_seconds": round(train_seconds), "threads": args.threads, "bf16_autocast": args.bf16,
        "lr": args.lr, "batch_tokens": args.batch_tokens, "seed": args.seed,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
