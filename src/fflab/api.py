"""The Python entry points of a run: train a preset on files or on your own arrays, load a model.

:func:`train` is what ``fflab train`` does, callable from Python and open to in-memory data:
the same run directory (``config.json``, ``metrics.jsonl``, an atomic checkpoint after every
epoch, ``summary.json``), the same ``resume``. :func:`load_run` gives back the trained model of
any algorithm.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fflab import checkpoint, runs
from fflab.data import ARRAYS, Datasets, from_arrays
from fflab.experiment import ALGORITHMS
from fflab.presets import from_dict, get_preset, resolve


def _datasets(data: Any) -> Datasets:
    if isinstance(data, Datasets):
        return data
    if isinstance(data, Mapping):
        return from_arrays(**data)
    if isinstance(data, Sequence) and len(data) == 4:
        return from_arrays(*data)
    raise TypeError(
        "data must be (x_train, y_train, x_test, y_test), a dict of fflab.data.from_arrays "
        "arguments, or fflab.data.Datasets"
    )


def _array_settings(preset: str, ds: Datasets, settings: dict) -> dict:
    """``settings`` with the data's sizes filled in where the model has such fields."""
    settings = {k: dict(v) for k, v in settings.items()}
    settings.setdefault("data", {})["dataset"] = ARRAYS
    fields = {
        f.name for f in dataclasses.fields(ALGORITHMS[get_preset(preset).algorithm].model_cls())
    }
    d = ds.train.x.shape[1]
    sizes = {"in_features": d, "num_classes": ds.num_classes, "n_visible": d}
    if ds.image_shape:
        shape = tuple(ds.image_shape)
        sizes["image_shape"] = shape if len(shape) == 3 else (1, *shape)
    # a preset's label overlay (or the twin's neutral overlay) relies on MNIST's blank first
    # pixels: on other data the label is concatenated instead, unless settings say otherwise
    preset_model = get_preset(preset).settings.get("model", {})
    if preset_model.get("label_mode") == "overlay":
        sizes["label_mode"] = "concat"
    if preset_model.get("label_input") == "neutral":
        sizes["label_input"] = "none"
    model = settings.setdefault("model", {})
    for key, value in sizes.items():
        if key in fields:
            model.setdefault(key, value)
    return settings


def train(
    preset: str,
    out_dir: str | Path,
    *,
    data: Any = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    data_dir: str | None = None,
    progress: bool = False,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train ``preset`` into the run directory ``out_dir`` and return its summary.

    Parameters
    ----------
    preset : str
        A preset name (``fflab presets`` lists them); its settings are the starting point.
    out_dir : path
        The run directory; it must not hold a run unless ``resume``.
    data : optional
        Your own data instead of the preset's dataset: ``(x_train, y_train, x_test, y_test)``
        as numpy arrays or tensors of any number of features and classes, a dict of
        :func:`fflab.data.from_arrays` arguments, or :class:`fflab.data.Datasets`. The model's
        input size, number of classes and image shape are taken from it unless ``settings``
        names them. Pass the same data again to resume (a fingerprint is checked).
    settings : dict, optional
        ``{section: {key: value}}`` on top of the preset, as ``--set section.key=value``.
    seed, device, data_dir, progress
        As the CLI's ``--seed``, ``--device`` (auto | cpu | cuda), ``--data-dir`` and its
        progress bars.
    resume : bool
        Continue the run in ``out_dir`` from its last checkpoint.
    tensorboard : bool
        Also write every epoch's metrics as TensorBoard scalars into ``out_dir/tensorboard``
        (needs the ``tensorboard`` extra).
    """
    dev = runs.resolve_device(device)
    ds = None if data is None else _datasets(data)
    if resume:
        return runs.train(
            None,
            Path(out_dir),
            device=dev,
            data_dir=data_dir,
            resume=True,
            progress=progress,
            datasets=ds,
            tensorboard=tensorboard,
        )
    over = {k: dict(v) for k, v in (settings or {}).items()}
    if ds is not None:
        over = _array_settings(preset, ds, over)
    config = resolve(preset, over, seed)
    return runs.train(
        config,
        Path(out_dir),
        device=dev,
        data_dir=data_dir,
        progress=progress,
        datasets=ds,
        tensorboard=tensorboard,
    )


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model of a run directory, in eval mode: an ``FFNet``, ``RecurrentFFNet``,
    ``BPNet``, ``RBM`` or ``BoltzmannMachine`` with the weights and buffers of its last
    checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise runs.RunError(f"{run_dir} is not a run directory (no config.json)")
    if not (run_dir / runs.CHECKPOINT).is_file():
        raise runs.RunError(f"{run_dir} has no checkpoint yet")
    config = from_dict(json.loads((run_dir / "config.json").read_text()))
    model = ALGORITHMS[config.algorithm].build_model(config.model)
    tensors, _ = checkpoint.load(run_dir / runs.CHECKPOINT, device)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(device).eval()
