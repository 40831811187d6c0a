"""Tests for fedapp.config: the pyproject defaults, Flower-style overrides, and the
one-line errors a bad run config produces."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fedapp.config import ConfigError, FedConfig, flatten, parse_config, unflatten

ROOT = Path(__file__).resolve().parents[1]
CONF_FILES = sorted((ROOT / "conf").glob("*.toml"))


@pytest.fixture(scope="module")
def defaults() -> dict[str, Any]:
    """The default run config, flat, as Flower hands it to the apps."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return flatten(table)


def config_error(run_config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(run_config)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def has_token(message: str, token: str) -> bool:
    """``token`` occurs in ``message`` not as part of a longer word or number."""
    return re.search(rf"(?<![\w.]){re.escape(token)}(?![\w])", message) is not None


# ----------------------------------------------------------------------------- defaults


def test_pyproject_defaults_match_the_model(defaults: dict[str, Any]) -> None:
    cfg = parse_config(defaults)
    flat = cfg.flat()
    assert set(flat) - set(defaults) == set(), "keys the model has but pyproject.toml lacks"
    assert set(defaults) - set(flat) == set(), "keys in pyproject.toml the model lacks"
    assert flat == defaults  # every value survives parsing unchanged


def test_model_defaults_round_trip() -> None:
    cfg = FedConfig()
    assert parse_config(cfg.flat()) == cfg
    assert parse_config({}) == cfg


def test_flatten_unflatten() -> None:
    tree = {"a": {"b": 1, "c": {"d": "x"}}, "e": 2}
    assert flatten(tree) == {"a.b": 1, "a.c.d": "x", "e": 2}
    assert unflatten(flatten(tree)) == tree
    assert unflatten({"a": {"b.c": 1}}) == {"a": {"b": {"c": 1}}}


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "key, value, read",
    [
        ("train.lr", 0.001, lambda c: c.train.lr),
        ("train.local-epochs", 3, lambda c: c.train.local_epochs),
        ("data.partitioner", "label-skew", lambda c: c.data.partitioner),
        ("model.dim-mults", "1,2", lambda c: c.model.mults),
        ("strategy.min-nodes", 5, lambda c: c.strategy.min_nodes),
        ("eval.sampler", "ddim", lambda c: c.eval.sampler),
        ("seed", 42, lambda c: c.seed),
    ],
)
def test_flat_override_changes_value(defaults: dict[str, Any], key: str, value: Any,
                                     read: Any) -> None:
    cfg = parse_config({**defaults, key: value})
    expected = (1, 2) if key == "model.dim-mults" else value
    assert read(cfg) == expected
    assert read(parse_config(defaults)) != expected  # the override did something
    flat = cfg.flat()
    assert flat[key] == value
    # nothing else moved
    assert {k: v for k, v in flat.items() if k != key} == {
        k: v for k, v in defaults.items() if k != key
    }


def test_nested_tables_are_accepted() -> None:
    cfg = parse_config({"train": {"lr": 0.002, "rounds": 3}, "model": {"dim": 8}})
    assert cfg.train.lr == 0.002 and cfg.train.rounds == 3 and cfg.model.dim == 8


def test_config_is_frozen(defaults: dict[str, Any]) -> None:
    cfg = parse_config(defaults)
    with pytest.raises(ValidationError):
        cfg.train.lr = 0.5  # type: ignore[misc]
    assert hash(cfg.data) == hash(parse_config(defaults).data)  # usable as a cache key


# ----------------------------------------------------------------------------- errors


def test_unknown_key_lists_allowed(defaults: dict[str, Any]) -> None:
    message = config_error({**defaults, "train.lrr": 0.001})
    assert "train.lrr" in message
    rest = message.replace("train.lrr", "")
    assert has_token(rest, "lr")
    assert has_token(rest, "local-epochs") and has_token(rest, "batch-size")


def test_unknown_section_key(defaults: dict[str, Any]) -> None:
    message = config_error({**defaults, "data.bogus": 1})
    assert "data.bogus" in message
    assert has_token(message, "partitioner") and has_token(message, "val-fraction")


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.rounds", "many"),  # wrong type
        ("train.lr", -1.0),  # out of range
        ("data.val-fraction", 1.5),
        ("model.dim", 0),
        ("data.alpha", 0.0),
        ("eval.num-samples", 0),
        ("data.download", "maybe"),
    ],
)
def test_bad_value_names_key_and_value(defaults: dict[str, Any], key: str, value: Any) -> None:
    message = config_error({**defaults, key: value})
    assert key in message
    assert has_token(message, str(value)), message


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("strategy.name", "fedbogus", ["full"]),
        ("data.partitioner", "dirichlet", ["iid", "label-skew", "quantity-skew", "pathological"]),
        ("eval.sampler", "euler", ["ddim", "ddpm"]),
        ("diffusion.loss", "l1", ["huber", "mse"]),
    ],
)
def test_bad_literal_lists_allowed_values(defaults: dict[str, Any], key: str, value: str,
                                          allowed: list[str]) -> None:
    message = config_error({**defaults, key: value})
    assert key in message and value in message
    for option in allowed:
        assert f"'{option}'" in message, (option, message)


@pytest.mark.parametrize("value", ["1,x", "", "1,,2", "1,0,2", "1;2"])
def test_bad_dim_mults(defaults: dict[str, Any], value: str) -> None:
    message = config_error({**defaults, "model.dim-mults": value})
    assert "model.dim-mults" in message
    assert repr(value) in message


def test_dim_mults_are_normalised(defaults: dict[str, Any]) -> None:
    cfg = parse_config({**defaults, "model.dim-mults": " 1, 2,4 "})
    assert cfg.model.dim_mults == "1,2,4"
    assert cfg.model.mults == (1, 2, 4)


@pytest.mark.parametrize("beta_end", [0.0001, 0.00005])
def test_beta_end_must_exceed_beta_start(defaults: dict[str, Any], beta_end: float) -> None:
    message = config_error({**defaults, "diffusion.beta-start": 0.0001,
                            "diffusion.beta-end": beta_end})
    assert "diffusion.beta-end" in message
    assert repr(beta_end) in message
    assert "diffusion.beta-start" in message


def test_several_errors_still_one_line(defaults: dict[str, Any]) -> None:
    message = config_error({**defaults, "train.rounds": "many", "train.lr": -1.0})
    assert "more" in message


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_scalar_then_nested_key_clash() -> None:
    message = config_error({"train.lr": 0.001, "train.lr.x": 1})
    assert "train.lr.x" in message


def test_nested_then_scalar_key_clash() -> None:
    config_error({"train.lr.x": 1, "train.lr": 0.001})


@pytest.mark.parametrize("key, value", [
    ("train.rounds", "3"), ("train.rounds", True), ("output.progress", "yes"),
    ("strategy.round-timeout", float("inf")), ("train.lr", float("nan")),
])
def test_strict_types_and_finite_numbers(key: str, value: object) -> None:
    message = config_error({key: value})
    assert key in message


def test_dotted_key_and_table_merge_in_any_order() -> None:
    cfg = parse_config({"train.rounds": 3, "train": {"lr": 0.1}})
    assert cfg.train.rounds == 3 and cfg.train.lr == 0.1


# ----------------------------------------------------------------------------- conf/*.toml

if CONF_FILES:  # only generated when the repository ships run configs

    @pytest.mark.parametrize("path", CONF_FILES, ids=lambda p: p.name)
    def test_conf_file_parses(path: Path) -> None:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
        cfg = parse_config(table)
        flat = cfg.flat()
        for key, value in flatten(table).items():
            assert flat[key] == value, key  # no value in the file is lost or changed
        # Flower passes the same file as flat keys; both spellings agree.
        assert parse_config(flatten(table)) == cfg


def test_ddim_steps_that_do_not_divide_t_are_a_config_error() -> None:
    message = config_error({"eval.sampler-steps": 7})
    assert "eval.sampler-steps" in message and "divide" in message
    assert "divide" in config_error({"eval.sampler-steps": 7, "eval.sampler": "ddpm"})  # a strided DDPM grid too
    assert parse_config({"eval.sampler-steps": 1000, "eval.sampler": "ddpm"}).eval.sampler_steps == 1000
