"""The keys users put in `--speculative-config` for DReSD and REST, and their validation.

`{"method": "dresd", "datastore": ..., "num_speculative_tokens": 10, ...}` is split into vLLM's own
`SpeculativeConfig` keys and ours; ours travel to the proposer in `additional_config[method]`.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class _Options:
    """Shared validation: every field's type is checked against its annotation."""

    method: typing.ClassVar[str]
    proposer: typing.ClassVar[str]
    ranges: typing.ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    """Closed [low, high] of numeric keys (None: unbounded), checked where the user starts vLLM."""
    datastore: str

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value, allowed = getattr(self, field.name), _allowed(hints[field.name])
            if not any(_matches(value, a) for a in allowed):
                names = " or ".join(a.__name__ if isinstance(a, type) else repr(a) for a in allowed)
                raise ValueError(
                    f"{self.method} {field.name!r} must be {names}, got {value!r} ({type(value).__name__})"
                )
        for name, (low, high) in self.ranges.items():
            value = getattr(self, name)
            if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
                bound = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
                raise ValueError(f"{self.method} {name!r} must be {bound}, got {value!r}")

    def check_speculative(self, speculative_config: dict[str, Any]) -> None:
        """Check vLLM's keys against ours (e.g. `num_speculative_tokens` against the datastore)."""

    @classmethod
    def from_dict(cls, options: dict[str, Any]):
        """Build from user keys; an unknown key is an error that lists the valid ones."""
        keys = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(options) - keys)
        if unknown:
            raise ValueError(f"unknown {cls.method} key(s) {unknown}; valid keys: {sorted(keys)}")
        if "datastore" not in options:
            raise ValueError(f"{cls.method} needs 'datastore': the output of `dresd-build`")
        return cls(**options)


@dataclass(frozen=True)
class DresdConfig(_Options):
    """DReSD's serving options (vLLM's own keys such as `num_speculative_tokens` stay vLLM's)."""

    method: typing.ClassVar[str] = "dresd"
    proposer: typing.ClassVar[str] = "dresd_vllm.proposer.DresdProposer"
    ranges: typing.ClassVar[dict[str, tuple[float | None, float | None]]] = dict(
        top_k=(1, None), max_candidates=(1, None), min_support=(0.0, 1.0), nprobe=(1, None), ef_search=(1, None),
        search_threads=(1, None), context_max_depth=(1, None), context_cached_requests=(0, None),
        context_min_prob=(0.0, 1.0), online_store_size=(1, None), token_cost=(0.0, None),
    )  # fmt: skip

    datastore: str
    """Directory written by `dresd-build datastore`."""
    top_k: int = 50
    """Neighbours fetched per request and step (the paper's 50)."""
    max_candidates: int = 10
    """Survivors of the first-token filter that are merged into the draft (the paper's 10)."""
    merge: Literal["trie", "top1"] = "trie"
    """`trie`: follow the heaviest branch of the survivors' prefix trie; `top1`: the nearest survivor."""
    min_support: float = 0.2
    """`trie` stops where the branch holds less than this share of the survivors' similarity weight."""
    backend: Literal["auto", "faiss", "faiss-gpu", "torch", "torch-ivf"] = "auto"
    """Search backend: FAISS (CPU or GPU), exact search with torch, or IVF search with torch on the model's
    device (`torch-ivf`). `auto`: FAISS on the CPU, `torch-ivf` (IVF stores) or `torch` on a GPU."""
    nprobe: int | None = None
    """IVF lists probed per query; None keeps the datastore's setting."""
    ef_search: int | None = None
    """HNSW search depth; None keeps the datastore's setting."""
    search_threads: int = 1
    """FAISS CPU threads; one is fastest for the small batches of a decoding step."""
    context: bool = True
    """Also draft from the request's own tokens and earlier responses (suffix tree), keeping per request
    the chain with the larger expected gain; false: the paper's pure dense retrieval."""
    context_max_depth: int = 24
    """Longest context suffix matched (vLLM suffix's suffix_decoding_max_tree_depth)."""
    context_cached_requests: int = 10000
    """Earlier responses the context's global tree keeps (0: the request's own tokens only)."""
    context_min_prob: float = 0.1
    """The context chain stops where the tree's frequency of its path falls below this."""
    online_store: bool = True
    """Add the verified states of served requests, with the tokens that followed, to an in-memory index
    searched next to the datastore."""
    online_store_size: int = 100000
    """Keys the online store holds; the oldest are evicted first."""
    length_control: bool = True
    """Cut each draft where its estimated chance of acceptance no longer pays for verifying the token
    (false: the dense chain stops at min_support, the context chain at context_min_prob)."""
    adapt: bool = True
    """Calibrate the acceptance estimates from what vLLM accepted of each draft."""
    token_cost: float | None = None
    """Step time one more verified token per request adds, as a share of the step; None: 0.04 (CPU) or
    0.004 (GPU) x batch size, at most 1."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not Path(self.datastore).is_dir():
            raise ValueError(
                f"dresd 'datastore': {self.datastore!r} is not a directory; "
                "point it at the output of `dresd-build datastore`"
            )

    def check_speculative(self, speculative_config: dict[str, Any]) -> None:
        """Refuse more speculative tokens than the datastore stores per key (its `n_next`)."""
        from .datastore import MANIFEST, DatastoreError, Manifest

        k = speculative_config.get("num_speculative_tokens")
        try:
            manifest = Manifest.from_json((Path(self.datastore) / MANIFEST).read_text())
        except (OSError, DatastoreError):
            return  # the proposer's load names what is wrong with the datastore
        if isinstance(k, int) and k > manifest.n_next:
            raise ValueError(
                f"num_speculative_tokens={k} is more than the {manifest.n_next} tokens the dresd datastore "
                f"{self.datastore} stores per key (n_next); use num_speculative_tokens <= {manifest.n_next}, "
                f"or rebuild the datastore with `dresd-build datastore --n-next {k}`"
            )


@dataclass(frozen=True)
class RestConfig(_Options):
    """REST's serving options: exact suffix match of the context in a corpus suffix array."""

    method: typing.ClassVar[str] = "rest"
    proposer: typing.ClassVar[str] = "dresd_vllm.rest_proposer.RestProposer"
    ranges: typing.ClassVar[dict[str, tuple[float | None, float | None]]] = dict(
        max_span=(1, None), min_span=(1, None), max_matches=(1, None), min_support=(0.0, 1.0)
    )

    datastore: str
    """File written by `dresd-build rest`."""
    max_span: int = 16
    """Longest context suffix searched (REST's 16)."""
    min_span: int = 2
    """Shortest context suffix searched (REST's 2)."""
    max_matches: int = 5000
    """Occurrences whose continuations are counted (REST's k = 5000)."""
    min_support: float = 0.2
    """The chain stops where its branch holds less than this share of the occurrences."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not Path(self.datastore).is_file():
            raise ValueError(
                f"rest 'datastore': {self.datastore!r} is not a file; point it at the output of `dresd-build rest`"
            )
        from .suffix_array import check_rest_file

        check_rest_file(self.datastore)
        if self.min_span > self.max_span:
            raise ValueError(f"rest needs 1 <= 'min_span' ({self.min_span}) <= 'max_span' ({self.max_span})")


METHODS: dict[str, type[_Options]] = {"dresd": DresdConfig, "rest": RestConfig}


def _allowed(hint: Any) -> list[Any]:
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(hint) for a in _allowed(arg)]
    return [hint]


def _matches(value: Any, allowed: Any) -> bool:
    if not isinstance(allowed, type):
        return value == allowed
    if isinstance(value, bool) and allowed is not bool:  # JSON true is not a count
        return False
    if allowed is float:
        return isinstance(value, int | float)
    return isinstance(value, allowed)


def split_speculative_config(
    speculative_config: dict[str, Any], additional_config: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn `{"method": "dresd" | "rest", ...}` into vLLM's custom_class form plus `additional_config[method]`.

    Keys that are neither ours nor `SpeculativeConfig`'s fail here, in the process the user
    started, rather than as a pydantic error about `extra` fields.
    """
    from vllm.config import SpeculativeConfig

    options_class = METHODS[speculative_config["method"]]
    method = options_class.method
    ours_keys = {f.name for f in dataclasses.fields(options_class)}  # type: ignore[arg-type]
    vllm_keys = set(SpeculativeConfig.__dataclass_fields__) - {"method", "model"}
    spec = {k.replace("-", "_"): v for k, v in speculative_config.items() if k != "method"}
    ours = {k: spec.pop(k) for k in list(spec) if k in ours_keys}
    if "model" in spec:
        raise ValueError(f"method {method!r} takes no 'model': it drafts by retrieval, not with a draft model")
    unknown = sorted(set(spec) - vllm_keys)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in --speculative-config for method {method!r}; "
            f"{method} keys: {sorted(ours_keys)}; vLLM keys such as 'num_speculative_tokens' are accepted too"
        )
    options_class.from_dict(ours).check_speculative(spec)
    extra = dict(additional_config or {})
    extra[method] = ours
    return {**spec, "method": "custom_class", "model": options_class.proposer}, extra
