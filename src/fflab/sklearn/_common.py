"""Plumbing shared by the estimators: parameter checks, seeds, arrays to tensors and back.

Training runs in float32 (the dtype of fflab's models): inputs of float32 or float64 are
accepted, float64 is rounded to float32 first, so the two copies of the same data give the
same model. Deterministic outputs (``predict_proba``, ``transform``) are computed in the
input's float dtype, with the model's weights cast up for float64, and returned in it.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import Tensor

FLOAT_DTYPES = (np.float64, np.float32)


def check_int(value, name: str, low: int) -> int:
    """``value`` as an int if it is an integer >= ``low`` (bools refused), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_real(value, name: str, low: float, high: float | None = None, *, open_low=False):
    """``value`` as a float in ``[low, high)`` (``(low, high)`` with ``open_low``), else
    ValueError; ``high=None`` means no upper bound."""
    bad = isinstance(value, bool) or not isinstance(value, Real)
    if not bad:
        v = float(value)
        bad = not np.isfinite(v) or v < low or (open_low and v == low)
        bad = bad or (high is not None and v >= high)
    if bad:
        left = "(" if open_low else "["
        right = "inf)" if high is None else f"{high})"
        raise ValueError(f"{name} must be a number in {left}{low}, {right}, got {value!r}")
    return float(value)


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def torch_generator(random_state) -> torch.Generator:
    """A CPU torch.Generator seeded from ``random_state`` (None, an int or a RandomState).

    The seed is the first draw of ``check_random_state(random_state)``: an int gives the same
    generator every time, a RandomState advances, None draws from numpy's global state.
    """
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    return torch.Generator().manual_seed(int(seed))


def to_tensor(X: np.ndarray, dtype=np.float32) -> Tensor:
    """A checked (N, D) float array -> tensor (N, D) of ``dtype``, sharing memory where it can.

    The tensor is only read. Read-only or non-contiguous arrays are copied (torch cannot wrap
    a read-only buffer).
    """
    x = np.asarray(X, dtype=dtype)
    if not (x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x, dtype=dtype, order="C", copy=True)
    return torch.from_numpy(x)


def out_dtype(X: np.ndarray) -> type:
    """The float dtype an output for input ``X`` is returned in (float64 or float32)."""
    return np.float64 if X.dtype == np.float64 else np.float32


def to_numpy(t: Tensor, dtype) -> np.ndarray:
    """A tensor as a numpy array of ``dtype`` (a new array: never a view of model memory)."""
    return t.detach().cpu().numpy().astype(dtype, copy=True)
