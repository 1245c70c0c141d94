"""`dresd-bench replay`: every proposer on recorded greedy trajectories, as vLLM's greedy loop would run it.

Record once: the plain greedy output of every prompt (past its end by k tokens, which a last draft may
be verified against) and the post-norm last-layer state at every position. Then each proposer is
stepped request after request (batch 1, in order, as `compare` runs them): every step hands it the
tokens and the states of the positions verified in that step, takes its draft, accepts the longest
prefix that matches the trajectory and advances by the accepted tokens plus one. A finished request's
last step is still proposed for, as in the engine, so stateful proposers (online store, context cache,
calibration) see exactly what they see there. DReSD runs through the same `Drafter` as the engine,
so the draft and accept counts equal the engine's.

`--grid KEY=V1,V2` replays every DReSD entry at each point of a grid of its keys (how the defaults
are chosen, on training prompts that are not in the datastore); `--best-of` adds the paper's
multi-draft verification as a bound: the best of the merged survivors, which a replay can tell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from build_tools.data import InputError

from .compare import describe
from .inputs import NGRAM, Method, Prompts, Settings, engine_kwargs
from .report import finish, fmt, markdown_table, table


@dataclasses.dataclass
class Trajectory:
    """One prompt's greedy run: prompt + output + k tokens past its end; ``states[q]`` produced ``tokens[q + 1]``."""

    prompt_len: int
    output_len: int  # tokens the request keeps (max_tokens, or up to its stop token)
    tokens: np.ndarray  # int32
    states: torch.Tensor  # float32 [len(tokens) - 1, H]


RECORD_BATCH = 16

# A proposer step: (req_ids, sampled_token_ids, num_tokens, token_ids, verified states, max_len) -> drafts.
Step = Callable[[list[str], list[list[int]], np.ndarray, np.ndarray, torch.Tensor, np.ndarray], list[list[int]]]


def record(
    settings: Settings, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int], cache: Path | None
) -> list[Trajectory]:
    """Greedy trajectories (and their states) of ``prompts``; each is kept in ``cache`` and reused by later runs."""
    k = settings.num_speculative_tokens
    run = [settings.model, settings.engine_args, k]  # not max_model_len: runs over other prompts reuse these
    keys = [
        hashlib.sha256(json.dumps([*run, m, list(map(int, p))]).encode()).hexdigest()[:20]
        for p, m in zip(prompts, max_tokens, strict=True)
    ]
    found: dict[int, Trajectory] = {}
    for i, key in enumerate(keys):
        if cache is not None and (cache / f"{key}.pt").is_file():
            found[i] = Trajectory(**torch.load(cache / f"{key}.pt", weights_only=False))
    missing = [i for i in range(len(prompts)) if i not in found]
    if missing:
        for i, t in zip(
            missing, _record([prompts[i] for i in missing], [max_tokens[i] for i in missing], settings), strict=True
        ):
            found[i] = t
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                torch.save(dataclasses.asdict(t), cache / f"{keys[i]}.pt")
    return [found[i] for i in range(len(prompts))]


def _record(prompts: list[Sequence[int]], max_tokens: list[int], settings: Settings) -> list[Trajectory]:
    from vllm import LLM, SamplingParams

    from build_tools.embed import EmbedWorker
    from build_tools.engine import close_llm

    k = settings.num_speculative_tokens
    # Greedy trajectories are recorded in batches: replay steps each request alone afterwards anyway.
    llm = LLM(model=settings.model, **engine_kwargs(settings, max_num_seqs=max(RECORD_BATCH, settings.batch_size)))
    try:
        stops = _stop_ids(llm)
        params = [SamplingParams(temperature=0.0, max_tokens=m + k, ignore_eos=True) for m in max_tokens]
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    finally:
        close_llm(llm)
    seqs = [list(p) + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs, strict=True)]
    engine = {k: v for k, v in engine_kwargs(settings, 1).items() if k not in ("max_model_len", "max_num_seqs")}
    worker = EmbedWorker(settings.model, settings.max_model_len, engine)
    try:
        states = worker.states(seqs)
    finally:
        worker.close()
    out = []
    for prompt, seq, state, m in zip(prompts, seqs, states, max_tokens, strict=True):
        output = np.asarray(seq[len(prompt) :])
        stop = np.flatnonzero(np.isin(output[:m], list(stops)))
        out.append(
            Trajectory(
                prompt_len=len(prompt),
                output_len=int(stop[0]) + 1 if len(stop) else m,
                tokens=np.asarray(seq, dtype=np.int32),
                states=state[:-1].float().contiguous(),
            )
        )
    return out


def _stop_ids(llm) -> set[int]:
    """The ids that end a request without ignore_eos: the tokenizer's EOS and the generation config's."""
    ids = set()
    tokenizer = llm.get_tokenizer()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


def replay(step: Step, trajectories: Sequence[Trajectory], k: int, max_model_len: int) -> dict[str, Any]:
    """Run ``step`` over ``trajectories`` one request after another; the engine's counters and more."""
    drafts = draft_tokens = accepted = steps = output_tokens = 0
    per_position = np.zeros(k, dtype=np.int64)
    start = time.perf_counter()
    for r, t in enumerate(trajectories):
        req = f"replay-{r}"
        row = t.tokens[None, :]
        end = t.prompt_len + t.output_len
        n = t.prompt_len + 1  # the prefill step samples the first token
        sampled = [int(t.tokens[t.prompt_len])]
        steps += 1
        while True:
            verified = t.states[n - len(sampled) - 1 : n - 1]
            max_len = np.array([max(0, min(k, max_model_len - n - 1))])
            (draft,) = step([req], [sampled], np.array([n]), row, verified, max_len)
            if n >= end:  # finished: the engine proposed for it, but never verifies this draft
                break
            truth = t.tokens[n : n + len(draft)]
            hit = int(np.logical_and.accumulate(np.asarray(draft) == truth).sum()) if draft else 0
            if draft:
                drafts += 1
                draft_tokens += len(draft)
                accepted += hit
                per_position[:hit] += 1
            sampled = t.tokens[n : n + hit + 1].tolist()
            n += hit + 1
            steps += 1
        output_tokens += t.output_len
    return dict(
        seconds=time.perf_counter() - start,
        steps=steps,
        output_tokens=output_tokens,
        drafts=drafts,
        draft_tokens=draft_tokens,
        accepted_tokens=accepted,
        tokens_per_step=output_tokens / steps,
        drafted_step_share=drafts / steps,
        draft_tokens_per_step=draft_tokens / steps,
        acceptance_rate=accepted / draft_tokens if draft_tokens else None,
        mean_acceptance_length=1 + accepted / drafts if drafts else None,
        acceptance_by_position=(per_position / drafts).tolist() if drafts else [],
    )


def make_step(method: Method, settings: Settings) -> tuple[Step, Callable[[], dict[str, Any]]]:
    """The proposer of ``method`` as a replay step, and a function returning its own stats."""
    config = {k: v for k, v in method.speculative_config.items() if k not in ("method", "num_speculative_tokens")}
    max_model_len = settings.max_model_len
    if method.kind == "dresd":
        from dresd_vllm.config import DresdConfig
        from dresd_vllm.index.search import SearchOptions
        from dresd_vllm.spec.drafting import Drafter
        from dresd_vllm.store.datastore import Datastore

        options = DresdConfig.from_dict(config)
        ds = Datastore.load(options.datastore, SearchOptions.of(options))
        drafter = Drafter(ds, options)

        def stats() -> dict[str, Any]:
            return dict(
                **dataclasses.asdict(drafter.stats),
                **dataclasses.asdict(drafter.retriever.stats),
                token_price_by_batch=drafter.price_table(),
            )

        return drafter.step, stats
    if method.kind == "suffix":
        from dresd_vllm.spec.context import SuffixTreeContext, suffix_tree_available

        # vLLM's suffix method is arctic-inference's suffix tree: the n-gram fallback would replay another method.
        if not suffix_tree_available():
            raise ValueError(
                "replaying vLLM's suffix method needs arctic-inference's suffix tree, which does not import here: "
                "install arctic-inference (docs/install.md) or leave suffix out of --methods"
            )
        source = SuffixTreeContext()

        def suffix(req_ids, sampled, num_tokens, token_ids, verified, max_len):
            found = source.candidates(req_ids, sampled, num_tokens, token_ids, int(max_len.max()))
            return [found.tokens[i][found.tokens[i] >= 0][: max_len[i]].tolist() for i in range(len(req_ids))]

        return suffix, dict
    if method.kind == "ngram":
        from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as find

        low = config.get("prompt_lookup_min", NGRAM["prompt_lookup_min"])
        high = config.get("prompt_lookup_max", NGRAM["prompt_lookup_max"])

        def ngram(req_ids, sampled, num_tokens, token_ids, verified, max_len):
            return [
                find(token_ids[i, : num_tokens[i]], low, high, max_model_len, int(max_len[i])).tolist()
                for i in range(len(req_ids))
            ]

        return ngram, dict
    if method.kind == "rest":
        from dresd_vllm.config import RestConfig
        from dresd_vllm.rest.drafting import RestDrafter

        rest = RestDrafter(RestConfig.from_dict(config))

        def rest_step(req_ids, sampled, num_tokens, token_ids, verified, max_len):
            return rest.step(sampled, num_tokens, token_ids, max_len)

        return rest_step, dict
    raise ValueError(f"replay has no {method.kind!r} proposer (it replays dresd, suffix, ngram and rest)")


def best_of_step(method: Method) -> Step:
    """The paper's multi-draft verification, as an upper bound: of the merged survivors, the one that matches longest.

    It reads the trajectory's future (which only a replay can), to tell what verifying every survivor
    in a batch, as the paper's Hugging Face loop did, would accept; vLLM verifies one chain.
    """
    from dresd_vllm.config import DresdConfig
    from dresd_vllm.index.search import SearchOptions
    from dresd_vllm.spec.retriever import Retriever
    from dresd_vllm.store.datastore import Datastore

    config = {k: v for k, v in method.speculative_config.items() if k not in ("method", "num_speculative_tokens")}
    options = DresdConfig.from_dict(config)
    ds = Datastore.load(options.datastore, SearchOptions.of(options))
    retriever = Retriever(ds, top_k=options.top_k, max_candidates=options.max_candidates)

    def step(req_ids, sampled, num_tokens, token_ids, verified, max_len):
        counts = np.fromiter(map(len, sampled), np.int64, len(sampled))
        last = np.fromiter((t[-1] if t else -1 for t in sampled), np.int64, len(sampled))
        width = min(int(max_len.max()), ds.n_next)
        found = retriever.candidates(retriever.search(verified, np.cumsum(counts) - 1), last, width)
        out = []
        for i in range(len(req_ids)):
            truth = token_ids[i, num_tokens[i] : num_tokens[i] + width]
            drafts = found.drafts[i, :, : len(truth)]
            hits = np.logical_and.accumulate(drafts == truth, axis=1).sum(axis=1) * found.valid[i]
            best = int(hits.argmax())
            out.append(drafts[best, : max_len[i]].tolist() if found.valid[i, best] else [])
        return out

    return step


def expand_grid(methods: list[Method], grid: list[str], best_of: bool) -> list[Method]:
    """Every DReSD entry at every combination of ``grid`` (``KEY=V1,V2``, JSON values), plus best-of-N entries."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise InputError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. token_cost=0.02,0.04)")
        try:
            axes.append([(key, json.loads(v)) for v in values.split(",")])
        except json.JSONDecodeError as e:
            raise InputError(f"--grid {item!r}: values must be JSON ({e})") from e
    out = []
    for m in methods:
        if m.kind != "dresd":
            out.append(m)
            continue
        for point in itertools.product(*axes):
            name = " ".join([m.name, *(f"{k}={v}" for k, v in point)])
            out.append(Method(name, m.kind, {**m.speculative_config, **dict(point)}))
        if best_of and m.speculative_config.get("context") is False:  # a bound on the dense source alone
            out.append(Method(f"{m.name} best-of-survivors", BEST_OF, m.speculative_config))
    return out


BEST_OF = "dresd-best-of"


HEADERS = [
    "method", "tokens/step", "drafted steps", "draft tok/step", "accept rate", "accept len", "ms/step", "token price",
]  # fmt: skip


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One table row per replayed method."""
    return [
        [
            r["name"],
            fmt(r["tokens_per_step"]),
            fmt(r["drafted_step_share"], ".1%"),
            fmt(r["draft_tokens_per_step"]),
            fmt(r["acceptance_rate"], ".1%"),
            fmt(r["mean_acceptance_length"]),
            fmt(1e3 * r["seconds"] / r["steps"], ".3f"),
            fmt(r["proposer_stats"].get("token_price"), ".3f"),
        ]
        for r in results
    ]


def run_methods(methods: list[Method], settings: Settings, trajectories: list[Trajectory]) -> list[dict[str, Any]]:
    """Replay every speculative method of ``methods`` (vanilla is skipped: 1 token per step by definition)."""
    results = []
    for method in methods:
        if method.speculative_config is None:
            continue
        step, stats = (best_of_step(method), dict) if method.kind == BEST_OF else make_step(method, settings)
        result = replay(step, trajectories, settings.num_speculative_tokens, settings.max_model_len)
        results.append(
            dict(
                name=method.name,
                kind=method.kind,
                speculative_config=method.speculative_config,
                **result,
                proposer_stats=stats(),
            )
        )
    return results


def record_prompts(settings: Settings, prompts: Prompts, cache: Path) -> list[Trajectory]:
    """The trajectories of the warm-up request and then every prompt, as `compare` runs them (stateful
    proposers see the warm-up there too)."""
    all_prompts = [prompts.warmup, *prompts.token_ids]
    max_tokens = [min(settings.max_tokens, 32)] + [settings.max_tokens] * len(prompts.token_ids)
    return record(settings, all_prompts, max_tokens, cache)


def run_replay(args: Namespace, methods: list[Method], settings: Settings, prompts: Prompts) -> int:
    """The `replay` command: record (or reuse) the trajectories, replay every method, report."""
    out_dir = Path(args.out)
    trajectories = record_prompts(settings, prompts, out_dir / "cache")
    results = run_methods(expand_grid(methods, args.grid, args.best_of), settings, trajectories)
    title = "replay: " + describe(settings, prompts, batch=False)
    print(f"\n{title}\n")
    print(table(HEADERS, rows(results)))
    best = {}
    for r in results:  # per DReSD entry, its grid point with the most tokens per step
        entry = r["name"].split(" ")[0]
        if r["kind"] == "dresd" and r["tokens_per_step"] > best.get(entry, {}).get("tokens_per_step", 0):
            best[entry] = dict(point=r["name"], tokens_per_step=r["tokens_per_step"])
    for entry, point in best.items():
        print(f"best {entry}: {point['point']} ({point['tokens_per_step']:.3f} tokens/step)")
    if any(r["kind"] == "dresd" for r in results):
        # Replay steps each request alone without an engine, so no step times: the price is the prior (or token_cost).
        print(
            "token price: the share of a step a draft token per request costs at batch 1; a replay has no engine "
            "steps to fit it from, so it is today's constants' (or token_cost); served, `dresd_stats` reports the fit"
        )
    body = dict(settings=settings.to_json(), prompts=prompts.source, grid=args.grid, best=best, methods=results)
    return finish(out_dir, "replay.json", body, markdown_table(HEADERS, rows(results)), list, [])
