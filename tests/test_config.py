"""dresd_vllm.config: every user key's type and range is checked, and each error names the key."""

import typing

import pytest

from dresd_vllm.config import METHODS, DresdConfig, RestConfig, split_speculative_config
from dresd_vllm.rest.suffix_array import write_rest_datastore


@pytest.fixture
def datastores(tmp_path) -> dict[str, str]:
    """A datastore path each method accepts (DReSD: a directory; REST: a real suffix-array file)."""
    rest = write_rest_datastore(tmp_path / "rest.npz", [[1, 2, 3, 4]], {})
    return {"dresd": str(tmp_path), "rest": str(rest)}


def _fields(cls) -> list[str]:
    return [name for name in cls.model_fields if name != "datastore"]


def _switches(cls) -> set[str]:
    return {name for name, field in cls.model_fields.items() if field.annotation is bool}


def _numeric(cls) -> set[str]:
    hints = {name: field.annotation for name, field in cls.model_fields.items()}
    return {k for k in _fields(cls) if {int, float} & set(typing.get_args(hints[k]) or (hints[k],))}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_defaults_are_valid(method, datastores):
    config = METHODS[method].from_dict({"datastore": datastores[method]})
    assert config.datastore == datastores[method]


@pytest.mark.parametrize(("cls", "key"), [(cls, key) for cls in (DresdConfig, RestConfig) for key in _fields(cls)])
def test_wrong_type_names_the_key_and_what_it_must_be(cls, key, datastores):
    with pytest.raises(ValueError, match=rf"^{cls.method} {key!r} must be .*, got \[1\] \(list\)$"):
        cls.from_dict({"datastore": datastores[cls.method], key: [1]})


@pytest.mark.parametrize(
    ("cls", "key"),
    [(cls, key) for cls in (DresdConfig, RestConfig) for key in _fields(cls) if key not in _switches(cls)],
)
def test_json_true_is_not_a_number(cls, key, datastores):
    with pytest.raises(ValueError, match=rf"^{cls.method} {key!r} must be"):
        cls.from_dict({"datastore": datastores[cls.method], key: True})


@pytest.mark.parametrize(
    ("cls", "key"), [(cls, key) for cls in (DresdConfig, RestConfig) for key in sorted(cls.ranges())]
)
def test_out_of_range_names_the_key_and_its_range(cls, key, datastores):
    low, high = cls.ranges()[key]
    for value in [v for v in (None if low is None else low - 1, None if high is None else high + 1) if v is not None]:
        with pytest.raises(ValueError, match=rf"^{cls.method} {key!r} must be (>=|<=|in) .*, got {value!r}$"):
            cls.from_dict({"datastore": datastores[cls.method], key: value})
    edge = {"datastore": datastores[cls.method], key: low if low is not None else high}
    if cls is RestConfig and key in ("min_span", "max_span"):
        edge["min_span"] = edge["max_span"] = edge[key]
    cls.from_dict(edge)  # the bounds themselves are allowed


def test_every_numeric_key_has_a_range():
    for cls in (DresdConfig, RestConfig):
        assert _numeric(cls) == set(cls.ranges()), f"{cls.method}: ranges differ from the numeric keys"


def test_an_integer_is_a_number(datastores):
    assert DresdConfig.from_dict({"datastore": datastores["dresd"], "min_support": 1}).min_support == 1.0


def test_every_bad_key_is_named(datastores):
    with pytest.raises(ValueError, match=r"^dresd 'top_k' must be >= 1, got 0; dresd 'merge' must be 'trie' or"):
        DresdConfig.from_dict({"datastore": datastores["dresd"], "top_k": 0, "merge": "best"})


def test_choice_lists_the_valid_values(datastores):
    with pytest.raises(ValueError, match=r"^dresd 'merge' must be 'trie' or 'top1', got 'best'"):
        DresdConfig.from_dict({"datastore": datastores["dresd"], "merge": "best"})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_key_lists_the_valid_ones(method, datastores):
    with pytest.raises(ValueError) as error:
        METHODS[method].from_dict({"datastore": datastores[method], "topk": 5})
    message = str(error.value)
    assert message.startswith(f"unknown {method} key(s) ['topk']; valid keys: ")
    for key in METHODS[method].model_fields:
        assert repr(key) in message


@pytest.mark.parametrize("method", sorted(METHODS))
def test_missing_datastore_says_where_it_comes_from(method):
    with pytest.raises(ValueError, match=rf"^{method} needs 'datastore': the output of `dresd-build`"):
        METHODS[method].from_dict({})


def test_datastore_of_the_wrong_kind(datastores):
    with pytest.raises(ValueError, match=r"dresd 'datastore': .* is not a directory"):
        DresdConfig.from_dict({"datastore": datastores["rest"]})
    with pytest.raises(ValueError, match=r"rest 'datastore': .* is not a file"):
        RestConfig.from_dict({"datastore": datastores["dresd"]})


def test_rest_spans_in_order(datastores):
    with pytest.raises(ValueError, match=r"rest needs 1 <= 'min_span' \(5\) <= 'max_span' \(4\)"):
        RestConfig.from_dict({"datastore": datastores["rest"], "min_span": 5, "max_span": 4})


def test_split_speculative_config(datastores):
    spec, extra = split_speculative_config(
        {"method": "dresd", "datastore": datastores["dresd"], "num_speculative_tokens": 4, "top-k": 8},
        {"other": 1},
    )
    assert spec == {"num_speculative_tokens": 4, "method": "custom_class", "model": DresdConfig.proposer}
    assert extra == {"other": 1, "dresd": {"datastore": datastores["dresd"], "top_k": 8}}


def test_split_refuses_unknown_keys_and_a_model(datastores):
    config = {"method": "rest", "datastore": datastores["rest"]}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_depth'\] in --speculative-config .*'max_span'"):
        split_speculative_config({**config, "max_depth": 3}, None)
    with pytest.raises(ValueError, match=r"method 'rest' takes no 'model'"):
        split_speculative_config({**config, "model": "x"}, None)
