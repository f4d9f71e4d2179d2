"""Presets: named, documented starting points for runs, as data.

Each preset names its algorithm and the settings that differ from the section defaults; its
``expected`` line says what result it gives and where that number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fflab.config import ConfigError, DataConfig, RunConfig, build_section, merge
from fflab.experiment import ALGORITHMS


@dataclass(frozen=True)
class Preset:
    name: str
    algorithm: str
    description: str
    expected: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


_HINTON = {"negatives": "hard", "lr_schedule": "hinton", "batch_size": 100}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "mnist-ff",
            "ff",
            "the paper's supervised FF run: 4 x 2000, 60 epochs, Hinton's optimizer settings",
            "paper: 1.36% test error (goodness scoring); about an hour on a 2-core CPU",
            {"model": {"hidden": [2000, 2000, 2000, 2000]}, "train": {**_HINTON, "epochs": 60}},
        ),
        Preset(
            "mnist-ff-hinton-code",
            "ff",
            "Hinton's released code: 3 x 1000, 100 epochs, hard negatives, peer normalization",
            "his code: 1.47% (another run 1.65%); about 30 min on a 2-core CPU",
            {"model": {"hidden": [1000, 1000, 1000]}, "train": {**_HINTON, "epochs": 100}},
        ),
        Preset(
            "mnist-ff-quick",
            "ff",
            "Hinton's code recipe with the schedule compressed to 32 epochs (what make demo runs)",
            "about 1.4% test error (goodness scoring) in under 10 minutes on a 2-core CPU",
            {"model": {"hidden": [1000, 1000, 1000]}, "train": {**_HINTON, "epochs": 32}},
        ),
        Preset(
            "mnist-bp",
            "bp",
            "the backprop twin of mnist-ff: 4 x 2000, same input and normalization, 20 epochs",
            "paper: about 1.4% test error for backprop on this kind of net in about 20 epochs",
            {"model": {"hidden": [2000, 2000, 2000, 2000]}, "train": {"epochs": 20}},
        ),
        Preset(
            "mnist-bp-hinton-code",
            "bp",
            "the backprop twin of mnist-ff-hinton-code: 3 x 1000, 20 epochs",
            "about 1.4% test error (backprop MLPs of this size: 1.3-1.6%)",
            {"model": {"hidden": [1000, 1000, 1000]}, "train": {"epochs": 20}},
        ),
        Preset(
            "smoke",
            "ff",
            "a seconds-long FF run for tests: 2 x 100 on 2,000 MNIST images, 2 epochs",
            "roughly 20-35% test error; it checks the plumbing, not the algorithm",
            {
                "data": {"train_subset": 2000},
                "model": {"hidden": [100, 100]},
                "train": {**_HINTON, "epochs": 2, "negatives": "random", "lr": 0.02},
            },
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; run 'fflab presets' to list them")
    return PRESETS[name]


def resolve(
    preset: str, overrides: dict[str, dict[str, Any]] | None = None, seed: int = 0
) -> RunConfig:
    """Build the run config of ``preset`` with ``overrides`` applied on top."""
    p = get_preset(preset)
    algo = ALGORITHMS[p.algorithm]
    settings = merge(p.settings, overrides or {})
    return RunConfig(
        preset=p.name,
        algorithm=p.algorithm,
        seed=seed,
        data=build_section(DataConfig, settings.get("data", {}), "data"),
        model=build_section(algo.model_cls(), settings.get("model", {}), "model"),
        train=build_section(algo.train_cls(), settings.get("train", {}), "train"),
    )


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a resolved config (``config.json`` of a run directory)."""
    if d.get("algorithm") not in ALGORITHMS:
        raise ConfigError(f"config names unknown algorithm {d.get('algorithm')!r}")
    algo = ALGORITHMS[d["algorithm"]]
    return RunConfig(
        preset=d["preset"],
        algorithm=d["algorithm"],
        seed=int(d["seed"]),
        data=build_section(DataConfig, d["data"], "data"),
        model=build_section(algo.model_cls(), d["model"], "model"),
        train=build_section(algo.train_cls(), d["train"], "train"),
    )
