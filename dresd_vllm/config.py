"""The keys users put in `--speculative-config` for DReSD and REST, and their validation.

`{"method": "dresd", "datastore": ..., "num_speculative_tokens": 10, ...}` is split into vLLM's own
`SpeculativeConfig` keys and ours; ours travel to the proposer in `additional_config[method]`.
Validation is pydantic's, strict (JSON `true` is not a count) and closed (`extra="forbid"`); its
errors are reworded to name the key and what it must be, in the process the user started.
"""

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Options(BaseModel):
    """Shared by the methods' options: strict, closed, frozen, and errors that name the key."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)

    method: typing.ClassVar[str]
    proposer: typing.ClassVar[str]
    datastore: str

    def check_speculative(self, speculative_config: dict[str, Any]) -> None:
        """Check vLLM's keys against ours (e.g. `num_speculative_tokens` against the datastore)."""

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> Self:
        """Build from user keys; a ValueError names the bad key and what it must be (an unknown key: the valid ones)."""
        try:
            return cls(**options)
        except ValidationError as e:
            raise ValueError(cls._explain(e.errors())) from None

    @classmethod
    def ranges(cls) -> dict[str, tuple[float | None, float | None]]:
        """Closed [low, high] of the numeric keys (None: unbounded), as their Field constraints say."""
        ranges: dict[str, tuple[float | None, float | None]] = {}
        for name, field in cls.model_fields.items():
            ge = (m.ge for m in field.metadata if isinstance(m, annotated_types.Ge))
            le = (m.le for m in field.metadata if isinstance(m, annotated_types.Le))
            low = next((b for b in ge if isinstance(b, int | float)), None)
            high = next((b for b in le if isinstance(b, int | float)), None)
            if low is not None or high is not None:
                ranges[name] = (low, high)
        return ranges

    @classmethod
    def _explain(cls, errors: list[Any]) -> str:
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        if unknown:
            return f"unknown {cls.method} key(s) {unknown}; valid keys: {sorted(cls.model_fields)}"
        if any(e["type"] == "missing" and e["loc"] == ("datastore",) for e in errors):
            return f"{cls.method} needs 'datastore': the output of `dresd-build`"
        return "; ".join(cls._explain_one(e) for e in errors)

    @classmethod
    def _explain_one(cls, error: Any) -> str:
        if not error["loc"]:  # a model validator's own message already names its keys
            return str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        key, value = str(error["loc"][0]), error["input"]
        if error["type"] in ("greater_than_equal", "less_than_equal"):
            low, high = cls.ranges()[key]
            bound = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            return f"{cls.method} {key!r} must be {bound}, got {value!r}"
        field = cls.model_fields[key]
        what = error["msg"].removeprefix("Input should be ")
        if not field.is_required() and field.default is None:
            what += " or null"
        return f"{cls.method} {key!r} must be {what}, got {value!r} ({type(value).__name__})"


class DresdConfig(_Options):
    """DReSD's serving options (vLLM's own keys such as `num_speculative_tokens` stay vLLM's)."""

    method: typing.ClassVar[str] = "dresd"
    proposer: typing.ClassVar[str] = "dresd_vllm.spec.proposer.DresdProposer"

    datastore: str
    """Directory written by `dresd-build datastore`."""
    top_k: Annotated[int, Field(ge=1)] = 50
    """Neighbours fetched per request and step (the paper's 50)."""
    max_candidates: Annotated[int, Field(ge=1)] = 10
    """Survivors of the first-token filter that are merged into the draft (the paper's 10)."""
    merge: Literal["trie", "top1"] = "trie"
    """`trie`: follow the heaviest branch of the survivors' prefix trie; `top1`: the nearest survivor."""
    min_support: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    """`trie` stops where the branch holds less than this share of the survivors' similarity weight."""
    backend: Literal["auto", "faiss", "faiss-gpu", "torch", "torch-ivf"] = "auto"
    """Search backend: FAISS (CPU or GPU), exact search with torch, or IVF search with torch on the model's
    device (`torch-ivf`). `auto`: FAISS on the CPU, `torch-ivf` (IVF stores) or `torch` on a GPU."""
    nprobe: Annotated[int | None, Field(ge=1)] = None
    """IVF lists probed per query; None keeps the datastore's setting."""
    ef_search: Annotated[int | None, Field(ge=1)] = None
    """HNSW search depth; None keeps the datastore's setting."""
    search_threads: Annotated[int, Field(ge=1)] = 1
    """FAISS CPU threads; one is fastest for the small batches of a decoding step."""
    context: bool = True
    """Also draft from the request's own tokens and earlier responses (suffix tree), keeping per request
    the chain with the larger expected gain; false: the paper's pure dense retrieval."""
    context_max_depth: Annotated[int, Field(ge=1)] = 24
    """Longest context suffix matched (vLLM suffix's suffix_decoding_max_tree_depth)."""
    context_cached_requests: Annotated[int, Field(ge=0)] = 10000
    """Earlier responses the context's global tree keeps (0: the request's own tokens only)."""
    context_min_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    """The context chain stops where the tree's frequency of its path falls below this."""
    online_store: bool = True
    """Add the verified states of served requests, with the tokens that followed, to an in-memory index
    searched next to the datastore."""
    online_store_size: Annotated[int, Field(ge=1)] = 100000
    """Keys the online store holds; the oldest are evicted first."""
    online_store_path: str | None = None
    """Directory where the states the server verifies (projected keys) and the tokens they produced are
    spooled, in checksummed chunks: reloaded into the online store at start-up, and a corpus for
    `dresd-build datastore --append --spool`. It holds every user's served tokens: off (None) by default;
    delete the directory to delete them."""
    online_store_spool_bytes: Annotated[int, Field(ge=1)] = 2**30
    """Most bytes the spool directory holds; past it the oldest chunks are deleted."""
    length_control: bool = True
    """Cut each draft where its estimated chance of acceptance no longer pays for verifying the token
    (false: the dense chain stops at min_support, the context chain at context_min_prob)."""
    adapt: bool = True
    """Calibrate the acceptance estimates from what vLLM accepted of each draft."""
    token_cost: Annotated[float | None, Field(ge=0.0)] = None
    """Step time one more verified token per request adds, as a share of the step; None: fitted from the
    engine's step times, starting from 0.04 x batch ** 1.15 (CPU) or 0.004 x batch (GPU), at most 1."""

    @model_validator(mode="after")
    def _datastore_is_a_directory(self) -> Self:
        if not Path(self.datastore).is_dir():
            raise ValueError(
                f"dresd 'datastore': {self.datastore!r} is not a directory; "
                "point it at the output of `dresd-build datastore`"
            )
        return self

    @model_validator(mode="after")
    def _spool_is_the_online_stores(self) -> Self:
        if self.online_store_path is None:
            return self
        if not self.online_store:
            raise ValueError("dresd 'online_store_path' spools the online store's keys: it needs 'online_store': true")
        if Path(self.online_store_path).exists() and not Path(self.online_store_path).is_dir():
            raise ValueError(
                f"dresd 'online_store_path': {self.online_store_path!r} exists and is not a directory; "
                "point it at a directory (it is created if missing)"
            )
        return self

    def check_speculative(self, speculative_config: dict[str, Any]) -> None:
        """Refuse more speculative tokens than the datastore stores per key (its `n_next`)."""
        from dresd_vllm.store.manifest import MANIFEST, DatastoreError, Manifest

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


class RestConfig(_Options):
    """REST's serving options: exact suffix match of the context in a corpus suffix array."""

    method: typing.ClassVar[str] = "rest"
    proposer: typing.ClassVar[str] = "dresd_vllm.rest.proposer.RestProposer"

    datastore: str
    """File written by `dresd-build rest`."""
    max_span: Annotated[int, Field(ge=1)] = 16
    """Longest context suffix searched (REST's 16)."""
    min_span: Annotated[int, Field(ge=1)] = 2
    """Shortest context suffix searched (REST's 2)."""
    max_matches: Annotated[int, Field(ge=1)] = 5000
    """Occurrences whose continuations are counted (REST's k = 5000)."""
    min_support: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    """The chain stops where its branch holds less than this share of the occurrences."""

    @model_validator(mode="after")
    def _datastore_and_spans(self) -> Self:
        if not Path(self.datastore).is_file():
            raise ValueError(
                f"rest 'datastore': {self.datastore!r} is not a file; point it at the output of `dresd-build rest`"
            )
        from dresd_vllm.rest.suffix_array import check_rest_file

        check_rest_file(self.datastore)
        if self.min_span > self.max_span:
            raise ValueError(f"rest needs 1 <= 'min_span' ({self.min_span}) <= 'max_span' ({self.max_span})")
        return self


METHODS: dict[str, type[_Options]] = {"dresd": DresdConfig, "rest": RestConfig}


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
    ours_keys = set(options_class.model_fields)
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
