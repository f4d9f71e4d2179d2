"""Checkpoints: safetensors files with JSON metadata, written atomically.

A checkpoint is written to a temporary file in the same directory and renamed over the old
one, so a crash or Ctrl-C mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable."""


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, tmp, metadata={"fflab": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        tensors = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fflab", "{}"))
    except Exception as e:  # safetensors raises its own, version-dependent errors
        raise CheckpointError(f"checkpoint {path} is unreadable ({e})") from None
    return tensors, meta


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict, dict]:
    """An optimizer's state as flat tensors plus JSON metadata (param groups, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, Tensor):
                tensors[f"{prefix}.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict, prefix: str = "optim"
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, k = key[len(prefix) + 1 :].split(".", 1)
            # a fresh copy: tensors read from a file can be misaligned in memory, and kernels
            # (GEMMs, fused steps) then round differently, so a resumed run would drift
            state.setdefault(int(idx), {})[k] = v.clone()
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    # hyperparameters come from the run's config (the optimizer as built); state from the file
    groups = opt.state_dict()["param_groups"]
    if [g["params"] for g in groups] != [g["params"] for g in meta["param_groups"]]:
        raise CheckpointError("checkpoint's optimizer does not match the model's parameters")
    opt.load_state_dict({"state": state, "param_groups": groups})
