"""Argument checks shared by the Boltzmann modules (raise ValueError, never assert)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_input(x, like: Tensor) -> Tensor:
    """Data as a tensor of the model's dtype and device: numpy arrays and lists are taken as
    they are (integers and booleans too), float64 data for a float32 model is cast.

    Anything else is left for the shape and dtype checks to reject with their messages.
    """
    if isinstance(x, Tensor):
        if x.dtype != like.dtype or x.device != like.device:
            return x.to(like.device, like.dtype)
        return x
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's wheels
        return x
    if isinstance(x, np.ndarray | list | tuple):
        arr = np.asarray(x)
        if arr.dtype.kind in "biuf":
            return torch.from_numpy(np.ascontiguousarray(arr)).to(like.device, like.dtype)
    return x


def check_units(n: int, name: str) -> int:
    """Return ``n`` if it is a positive int, else raise ValueError."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return n


def check_last_dim(x: Tensor, n: int, name: str) -> Tensor:
    """Require a floating tensor of shape (..., n)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"{name} must have shape (..., {n}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_batch(x: Tensor, n: int, name: str) -> Tensor:
    """Require a non-empty 2-D floating tensor of shape (batch, n)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(f"{name} must have shape (batch, {n}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one row")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_binary(x: Tensor, name: str) -> Tensor:
    """Require every entry of ``x`` to be exactly 0 or 1."""
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must be binary (every value 0 or 1)")
    return x


def check_unit_interval(x: Tensor, name: str) -> Tensor:
    """Require every entry of ``x`` to lie in [0, 1] (probabilities or binary values)."""
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(f"{name} must have every value in [0, 1] (NaN not allowed)")
    return x


def check_generator(generator: object) -> torch.Generator:
    """Require an explicit torch.Generator: randomness is always passed in."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def bernoulli(p: Tensor, generator: torch.Generator) -> Tensor:
    """Sample 0/1 values (same dtype as ``p``) with success probabilities ``p``."""
    u = torch.empty_like(p).uniform_(generator=generator)  # rand's numbers, less overhead
    return u.lt_(p)  # in place: 1.0 where u < p, else 0.0 (no bool tensor, no copy)
