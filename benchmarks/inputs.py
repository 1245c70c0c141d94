"""What every `dresd-bench` mode shares: the methods to run, the prompts, and the engine settings.

Every method sees the same prompt token ids (rendered once with the datastore's template), the same
`num_speculative_tokens`, `max_tokens`, batch size and seed, so the only difference is the drafter.
"""

import importlib.util
import json
import os
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from build_tools.data import InputError, Template, get_text, load_rows

KINDS = ("vanilla", "ngram", "suffix", "draft_model", "rest", "dresd")
# Prompt lookup decoding as vLLM documents it; n-grams of 2-4 tokens matched in the prompt and output so far.
NGRAM = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
# DReSD as the paper has it: dense retrieval over the static datastore alone, drafts cut at min_support.
PURE_DRESD = {"context": False, "online_store": False, "length_control": False}
# A fixed warm-up prompt that is in no dataset: suffix decoding caches every response it has seen,
# so warming up on a measured prompt would hand it that prompt's answer.
WARMUP_PROMPT = "Write a short greeting."


@dataclass(frozen=True)
class Method:
    """One entry of a comparison: `name` is unique (`dresd-ID`), `kind` one of KINDS."""

    name: str
    kind: str
    speculative_config: dict[str, Any] | None


@dataclass(frozen=True)
class Settings:
    """What every method runs with."""

    model: str
    num_speculative_tokens: int
    max_tokens: int
    batch_size: int
    seed: int
    temperature: float
    top_p: float
    max_model_len: int
    engine_args: dict[str, Any]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prompts:
    """Prompt token ids, identical for every method, and where they came from."""

    token_ids: list[list[int]]
    warmup: list[int]
    source: dict[str, Any]


def parse_named_paths(values: list[str], flag: str) -> list[tuple[str | None, str]]:
    """`["ID=/a", "/b"]` -> `[("ID", "/a"), (None, "/b")]`; names must be unique."""
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        out.append((name, path) if sep and name and os.sep not in name else (None, value))
    names = [n for n, _ in out]
    if len(out) > 1 and (None in names or len(set(names)) != len(names)):
        raise InputError(f"{flag}: give each of several datastores a unique name, e.g. {flag} ID=DIR {flag} OOD=DIR")
    return out


def build_methods(args: Namespace, k: int) -> list[Method]:
    """The methods of `args.methods` (vanilla always first), with their speculative configs for `k` tokens."""
    datastores = parse_named_paths(args.datastore, "--datastore")
    requested = args.methods.split(",") if args.methods else _available(args, datastores)
    unknown = sorted(set(requested) - set(KINDS))
    if unknown:
        raise InputError(f"--methods: unknown {unknown}; choose from {','.join(KINDS)}")
    overrides = _method_overrides(args.method_config)
    methods = [Method("vanilla", "vanilla", None)]
    for kind in dict.fromkeys(requested):  # in the user's order, once each
        if kind == "vanilla":
            continue
        if kind == "dresd":
            if not datastores:
                raise InputError("--methods dresd needs --datastore DIR (written by `dresd-build datastore`)")
            # Every datastore as the paper's pure DReSD and as the full proposer, so each comparison shows both.
            for name, path in datastores:
                base = f"dresd-{name}" if name else "dresd"
                config = {"method": "dresd", "datastore": path}
                methods.append(Method(base, "dresd", {**config, **PURE_DRESD}))
                methods.append(Method(f"{base}+context", "dresd", config))
            continue
        if kind == "rest":
            if not args.rest_datastore:
                raise InputError("--methods rest needs --rest-datastore FILE (written by `dresd-build rest`)")
            config = {"method": "rest", "datastore": args.rest_datastore}
        elif kind == "draft_model":
            if not args.draft_model:
                raise InputError("--methods draft_model needs --draft-model (a small model of the same tokenizer)")
            config = {"method": "draft_model", "model": args.draft_model}
        elif kind == "ngram":
            config = {"method": "ngram", **NGRAM}
        else:
            config = {"method": kind}
        methods.append(Method(kind, kind, config))
    unused = sorted(set(overrides) - {m.name for m in methods} - {m.kind for m in methods})
    if unused:
        raise InputError(f"--method-config: no method {unused} in this run ({', '.join(m.name for m in methods)})")
    return [_configured(m, k, overrides) for m in methods]


def _available(args: Namespace, datastores: list) -> list[str]:
    kinds = ["vanilla", "ngram"]
    if importlib.util.find_spec("arctic_inference"):  # vLLM's suffix method needs it (the `suffix` extra)
        kinds.append("suffix")
    if args.draft_model:
        kinds.append("draft_model")
    if args.rest_datastore:
        kinds.append("rest")
    if datastores:
        kinds.append("dresd")
    return kinds


def _method_overrides(values: list[str]) -> dict[str, dict[str, Any]]:
    overrides = {}
    for value in values:
        name, sep, text = value.partition("=")
        try:
            config = json.loads(text) if sep else None
        except json.JSONDecodeError as e:
            raise InputError(f"--method-config {value!r}: not JSON ({e})") from e
        if not isinstance(config, dict):
            raise InputError(f"--method-config {value!r}: expected NAME='{{...}}', a method and a JSON object")
        if {"method", "num_speculative_tokens"} & set(config):
            raise InputError("--method-config: 'method' and 'num_speculative_tokens' are set by dresd-bench")
        overrides.setdefault(name, {}).update(config)
    return overrides


def _configured(method: Method, k: int, overrides: dict[str, dict[str, Any]]) -> Method:
    if method.speculative_config is None:
        if overrides.get("vanilla"):
            raise InputError("--method-config: vanilla has no speculative config")
        return method
    # A kind's keys apply to every entry of that kind; an entry's own name wins (dresd, then dresd-OOD).
    config = {**method.speculative_config, **overrides.get(method.kind, {})}
    if method.name != method.kind:
        config.update(overrides.get(method.name, {}))
    return Method(method.name, method.kind, {**config, "num_speculative_tokens": k})


def dresd_templates(methods: list[Method]) -> set[str]:
    """The prompt templates recorded in the DReSD datastores of `methods`."""
    from dresd_vllm.store.manifest import MANIFEST, DatastoreError, Manifest

    templates = set()
    for m in methods:
        if m.kind == "dresd":
            path = Path(m.speculative_config["datastore"]) / MANIFEST
            try:
                templates.add(Manifest.from_json(path.read_text(), source=str(path)).template)
            except (OSError, DatastoreError) as e:
                raise InputError(f"{m.name}: cannot read the datastore manifest ({e})") from e
    return templates


def load_prompts(args: Namespace, methods: list[Method], tokenizer: Any) -> Prompts:
    """The first `args.limit` prompts of the dataset, rendered with the datastores' template."""
    templates = dresd_templates(methods)
    if args.template:
        template_name = args.template
    elif len(templates) > 1:
        raise InputError(f"the datastores were built with different templates {sorted(templates)}; pass --template")
    else:
        template_name = templates.pop() if templates else "chat"
    template = Template(template_name, tokenizer)
    # Reserved evaluation rows (`sharegpt:eval`) are for measuring, never for tuning.
    reserved_ok = getattr(args, "command", None) != "sweep"
    rows = load_rows(args.dataset, args.split, args.limit, args.skip, reserved_ok=reserved_ok)
    if not rows:
        raise InputError(f"{args.dataset}: no rows")
    texts = [get_text(row, args.prompt_key, i) for i, row in enumerate(rows)]
    token_ids = template.encode_prompts(texts)
    (warmup,) = template.encode_prompts([WARMUP_PROMPT])
    source = dict(
        dataset=args.dataset,
        split=args.split,
        skip=args.skip,
        prompt_key=args.prompt_key,
        template=template_name,
        prompts=len(rows),
    )
    return Prompts(token_ids=token_ids, warmup=warmup, source=source)


def make_settings(args: Namespace, prompts: Prompts, k: int) -> Settings:
    """Settings from `args`; without --max-model-len, room for the drafter on every step of every request.

    vLLM needs the longest prompt + max_tokens + k + 1. With less than k more, it skips the drafter on a
    request's last steps and verifies k placeholder tokens instead, which every method then pays for.
    """
    longest = max(map(len, [*prompts.token_ids, prompts.warmup]))
    needed = longest + args.max_tokens + k + 1
    room = needed + k
    if args.max_model_len is not None and args.max_model_len < needed:
        raise InputError(
            f"--max-model-len {args.max_model_len} < {needed}: the longest prompt ({longest} tokens) "
            f"+ --max-tokens {args.max_tokens} + {k} speculative tokens + 1 must fit; use --limit or a larger value"
        )
    return Settings(
        model=args.model,
        num_speculative_tokens=k,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        max_model_len=args.max_model_len or room,
        engine_args=args.engine_args,
    )


def engine_environment(offline: bool) -> None:
    """Set dresd-bench's vLLM environment; the user's own settings win. Call before the first engine starts.

    `offline`: for the commands that start `vllm.LLM` engines in this process (compare, sweep); serve
    keeps the settings it always had, which its servers inherit.
    """
    # A 1 GiB CPU KV cache, as `make` and the tests use (vLLM's default takes a share of all memory).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if offline:
        # In-process engines start in seconds rather than ~20 s on the CPU.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # With a separate engine process, collective_rpc ships our worker functions (the proposer timer, ...)
        # by msgpack, which refuses functions unless vLLM may fall back to pickle; they are our own code,
        # sent to the engine this process started.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def engine_kwargs(settings: Settings, max_num_seqs: int) -> dict[str, Any]:
    """`vllm.LLM` arguments: the project's CPU settings on a CPU build, then the user's."""
    from vllm.platforms import current_platform

    base = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3) if current_platform.is_cpu() else {}
    return {
        **base,
        "seed": settings.seed,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": max_num_seqs,
        **settings.engine_args,
    }
