"""Run configuration: frozen, typed sections, built from a preset plus ``section.key=value``.

A run has three sections, each a frozen dataclass: ``data`` (:class:`DataConfig`, shared by
every algorithm), ``model`` and ``train`` (the algorithm's own). Overrides are parsed against
the field types, so an unknown key or an ill-typed value is a :class:`ConfigError` with a
one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """An invalid preset, override or configuration value (a usage error)."""


@dataclass(frozen=True)
class DataConfig:
    """Which data a run sees."""

    # mnist | fashion-mnist | digits (scikit-learn's 8 x 8 digits, no download) | arrays
    # (data handed over in memory: fflab.train(..., data=...))
    dataset: str = "mnist"
    validation: bool = False  # hold out the last 10,000 training images
    train_subset: int = 0  # use only the first N training images (0: all)
    test_subset: int = 0  # evaluate on the first N test images only (0: all; for quick checks)
    binarize: str = "none"  # none | sample (Bernoulli, once, fixed seed) | threshold (at 0.5)
    binarize_seed: int = 0
    eval_batch_size: int = 1000
    # per-epoch evaluation (validation split; test error with train.log_test_error) after
    # every N-th epoch and the last; goodness scoring of 10,000 images costs C forward passes
    # of each, about half an epoch of 4 x 2000 training
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.binarize not in ("none", "sample", "threshold"):
            raise ValueError(f"binarize must be none, sample or threshold, got {self.binarize!r}")
        if self.train_subset < 0 or self.test_subset < 0:
            raise ValueError("train_subset and test_subset must be >= 0")
        if self.eval_batch_size < 1 or self.eval_every < 1:
            raise ValueError("need eval_batch_size >= 1 and eval_every >= 1")


@dataclass(frozen=True)
class RunConfig:
    preset: str
    algorithm: str
    seed: int
    data: DataConfig
    model: Any
    train: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "algorithm": self.algorithm,
            "seed": self.seed,
            "data": dataclasses.asdict(self.data),
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``tp`` (int, float, bool, str, tuples, optionals)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, args[0], key)
    if origin is tuple:
        (elem, *_) = typing.get_args(tp)
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()] if text else []
        return tuple(_parse_value(p.strip(), elem, key) for p in parts)
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {text!r}") from None
    return text


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a preset value (JSON-like) to the field type."""
    if isinstance(value, str):
        return _parse_value(value, tp, key)
    if isinstance(value, list):
        return tuple(value)
    return value


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown setting {section}.{k}; known: {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], f"{section}.{k}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["train.lr=0.1", ...]`` -> ``{"train": {"lr": "0.1"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name or section not in ("data", "model", "train"):
            raise ConfigError(
                f"--set {item!r}: expected section.key=value with section data, model or train"
            )
        out.setdefault(section, {})[name] = value.strip()
    return out


def merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out
