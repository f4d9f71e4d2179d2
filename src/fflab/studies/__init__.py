"""Studies: measured answers to the FF paper's claims and its open question.

A study trains what it needs through the ordinary run loop (each net in a run directory under
the study's directory, so an interrupted study resumes its runs), measures, and writes
``report.md``, ``results.json`` and PNG figures into its directory. ``fflab study NAME
[--quick]`` runs one; ``fflab study --list`` lists them. A study is a module with
``DESCRIPTION`` and ``run(ctx) -> dict``, registered in :data:`STUDIES`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fflab import checkpoint

STUDIES = {
    "goodness": "fflab.studies.goodness",
    "dead-units": "fflab.studies.dead_units",
    "black-box": "fflab.studies.black_box",
    "negatives": "fflab.studies.negatives",
    "memory": "fflab.studies.memory",
    "ff-vs-bm": "fflab.studies.ff_vs_bm",
}
# Settings a study's runs take under a preset that has changed since the numbers of
# docs/studies.md were measured, so that those commands still give those numbers:
# mnist-ff-unsup-quick trained at lr 0.005 up to commit b859793 (its own runs now take 0.01).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {"mnist-ff-unsup-quick": {"train": {"lr": 0.005}}}


@dataclass
class StudyContext:
    """Where a study writes and what it trains on.

    ``data`` (optional): ``(x_train, y_train, x_test, y_test)`` arrays instead of MNIST
    (tests use scikit-learn's digits); ``settings`` are merged into every run's settings.
    """

    out_dir: Path
    quick: bool = False
    seed: int = 0
    data_dir: str | None = None
    data: Any = None
    image_shape: tuple[int, int] = (28, 28)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: Callable[[str], None] = lambda s: None

    def train(self, name: str, preset: str, settings: dict[str, dict[str, Any]]) -> Path:
        """Train ``preset`` with ``settings`` (over the preset's :data:`RECIPES` entry) into
        ``out_dir/name`` (resuming an unfinished run, reusing a finished one); returns the
        run directory."""
        import fflab

        run_dir = self.out_dir / name
        merged: dict[str, dict[str, Any]] = {}
        for layer in (RECIPES.get(preset, {}), settings, self.settings):
            for section, values in layer.items():
                merged.setdefault(section, {}).update(values)
        if (run_dir / "summary.json").is_file():
            self.log(f"{name}: reusing the finished run in {run_dir}")
        elif (run_dir / "config.json").is_file():
            self.log(f"{name}: resuming {run_dir}")
            fflab.train(preset, run_dir, data=self.data, resume=True, data_dir=self.data_dir)
        else:
            self.log(f"{name}: training {preset} into {run_dir}")
            fflab.train(
                preset,
                run_dir,
                data=self.data,
                settings=merged,
                seed=self.seed,
                data_dir=self.data_dir,
            )
        return run_dir


def run_data(run_dir: Path, ctx: StudyContext):
    """The run's config and test split (the data it was trained with)."""
    import torch

    from fflab import runs as run_loop
    from fflab.api import _datasets
    from fflab.presets import from_dict

    config = from_dict(json.loads((run_dir / "config.json").read_text()))
    given = None if ctx.data is None else _datasets(ctx.data)
    ds = run_loop.prepare_data(config, ctx.data_dir, torch.device("cpu"), given)
    return config, ds.test


def standard_error(error_percent: float, n: int) -> float:
    """One binomial standard error, in points, of a test error (percent) measured on n
    images: ``100 sqrt(p (1 - p) / n)``."""
    p = error_percent / 100.0
    return 100.0 * (p * (1 - p) / max(n, 1)) ** 0.5


def describe() -> dict[str, str]:
    """Every study's one-line description, by name."""
    return {name: importlib.import_module(mod).DESCRIPTION for name, mod in STUDIES.items()}


def run_study(name: str, ctx: StudyContext) -> dict[str, Any]:
    """Run study ``name``; writes ``results.json`` (and the study's report and figures)."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    results = importlib.import_module(STUDIES[name]).run(ctx)
    payload = {"study": name, "quick": ctx.quick, "seed": ctx.seed, **results}
    checkpoint.atomic_write_text(ctx.out_dir / "results.json", json.dumps(payload, indent=2))
    return payload
