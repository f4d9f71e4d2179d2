"""Black boxes: fixed, non-differentiable maps to put between the layers of an FF net.

FF learns without a gradient ever crossing a layer, so a module between two layers needs no
derivative at all: the layer above learns from whatever the box hands it. Pass boxes to
:class:`fflab.ff.model.FFNet` as ``between`` (one per gap between consecutive hidden layers);
each maps a layer's activities ``a`` (N, H) to the next layer's input (N, H) *before* that
layer's RMS normalization. Goodness, peer normalization and the softmax head read the layer's
own activities, not the box's output.

Every box here is elementwise or a fixed reordering, holds no trainable parameters, keeps the
input's shape, dtype and device, and has no useful gradient (rounding and table lookups are
piecewise constant; :class:`NumpyFunction` leaves torch altogether). Their fixed random parts
(permutation, signs, table) are drawn once from an explicit ``torch.Generator`` and kept as
buffers, so they move with ``.to(device)`` and are saved in a ``state_dict``.

Shapes: ``N`` rows, ``H`` units.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn


def quantize_levels(a: Tensor, levels: int, lo: float, hi: float) -> Tensor:
    """Index of the nearest of ``levels`` evenly spaced values on [lo, hi]: (...) -> (...) long.

    Values below ``lo`` go to level 0, above ``hi`` to ``levels - 1``; level ``k`` stands for
    ``lo + k (hi - lo) / (levels - 1)``. Ties round half to even (``torch.round``).
    """
    step = (hi - lo) / (levels - 1)
    return torch.round((a - lo) / step).clamp_(0, levels - 1).long()


class Quantizer(nn.Module):
    """Uniform quantizer: each value snapped to the nearest of ``2**bits`` levels on [lo, hi].

    ``q(a) = lo + k (hi - lo) / (2**bits - 1)`` with ``k = clamp(round((a - lo) / step), 0,
    2**bits - 1)``. The default, 4 bits on [0, 4], gives the levels 0, 4/15, 8/15, ..., 4: a
    ReLU layer whose goodness sits near its threshold (``theta`` = number of units, a mean
    square of 1) has most of its activities inside that range; larger ones are clipped to 4.
    """

    def __init__(self, bits: int = 4, lo: float = 0.0, hi: float = 4.0) -> None:
        super().__init__()
        if bits < 1 or not hi > lo:
            raise ValueError(f"Quantizer needs bits >= 1 and hi > lo, got {bits}, [{lo}, {hi}]")
        self.bits, self.lo, self.hi = bits, float(lo), float(hi)

    @property
    def levels(self) -> int:
        return 2**self.bits

    def forward(self, a: Tensor) -> Tensor:
        step = (self.hi - self.lo) / (self.levels - 1)
        k = quantize_levels(a, self.levels, self.lo, self.hi).to(a.dtype)
        return k * step + self.lo

    def extra_repr(self) -> str:
        return f"bits={self.bits}, lo={self.lo:g}, hi={self.hi:g}"


class SignedPermutation(nn.Module):
    """A fixed random signed permutation of the units: ``out[:, j] = sign[j] * a[:, perm[j]]``.

    ``perm`` is a uniform random permutation of the ``width`` units and each ``sign`` is +1 or
    -1 with probability 1/2, both drawn from ``generator``. It is the orthogonal matrix ``P``
    with ``P[j, perm[j]] = sign[j]``, so :meth:`inverse` (``P' y``) undoes it exactly; it is
    also the exact vector-Jacobian product of the box, which a backprop baseline may use.
    """

    def __init__(self, width: int, generator: torch.Generator) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"SignedPermutation needs width >= 1, got {width}")
        perm = torch.randperm(width, generator=generator)
        sign = torch.randint(0, 2, (width,), generator=generator) * 2 - 1
        self.register_buffer("perm", perm)
        self.register_buffer("sign", sign.to(torch.float32))
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, a: Tensor) -> Tensor:
        if a.shape[-1] != self.perm.numel():
            raise ValueError(f"SignedPermutation of {self.perm.numel()} units got {a.shape[-1]}")
        return a.index_select(-1, self.perm) * self.sign.to(a.dtype)

    def inverse(self, y: Tensor) -> Tensor:
        """``P' y``: ``out[:, perm[j]] = sign[j] * y[:, j]`` (the transpose; undoes forward)."""
        return (y * self.sign.to(y.dtype)).index_select(-1, self.inverse_perm)

    def vjp(self, grad: Tensor) -> Tensor:
        """Exact gradient with respect to the input from one with respect to the output."""
        return self.inverse(grad)


class NumpyFunction(nn.Module):
    """An elementwise function computed by numpy, outside torch: ``out = fn(a.numpy())``.

    The activities are copied to the CPU as a numpy array, ``fn`` (default ``np.tanh``) maps
    it, and the result comes back as a tensor of the input's dtype on the input's device.
    Autograd cannot follow the trip, which is the point: the box is opaque to torch.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray] = np.tanh, name: str = "") -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError("NumpyFunction needs a callable fn (numpy array -> numpy array)")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")

    def forward(self, a: Tensor) -> Tensor:
        out = np.asarray(self.fn(a.detach().cpu().numpy()))
        if out.shape != tuple(a.shape):
            raise ValueError(f"NumpyFunction {self.name}: shape {out.shape} for input {a.shape}")
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=a.device, dtype=a.dtype)

    def extra_repr(self) -> str:
        return f"fn={self.name}"


class LookupTable(nn.Module):
    """Quantize to ``len(table)`` levels on [lo, hi], then read a fixed table: ``table[k]``.

    ``k`` is :func:`quantize_levels` of the input (nearest level, clipped at both ends), so
    the box is ``a -> table[k(a)]``. :meth:`random` draws a table: uniform on [0, 1) and
    sorted (``monotone``: a random increasing staircase) or left in draw order (a random
    non-monotone map: neighbouring levels get unrelated values).
    """

    def __init__(self, table: Tensor, lo: float = 0.0, hi: float = 4.0) -> None:
        super().__init__()
        table = torch.as_tensor(table, dtype=torch.float32)
        if table.dim() != 1 or table.numel() < 2 or not hi > lo:
            raise ValueError("LookupTable needs a 1-D table of >= 2 values and hi > lo")
        self.lo, self.hi = float(lo), float(hi)
        self.register_buffer("table", table)

    @classmethod
    def random(
        cls,
        generator: torch.Generator,
        levels: int = 256,
        lo: float = 0.0,
        hi: float = 4.0,
        monotone: bool = False,
    ) -> LookupTable:
        values = torch.rand(levels, generator=generator)
        return cls(values.sort().values if monotone else values, lo, hi)

    def forward(self, a: Tensor) -> Tensor:
        k = quantize_levels(a, self.table.numel(), self.lo, self.hi)
        return self.table[k].to(a.dtype)

    def extra_repr(self) -> str:
        return f"levels={self.table.numel()}, lo={self.lo:g}, hi={self.hi:g}"


class Function(nn.Module):
    """Any callable ``fn(a) -> Tensor`` as a module (what ``FFNet(between=[fn])`` wraps)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"a box must be callable (a module or a function), got {fn!r}")
        self.fn = fn

    def forward(self, a: Tensor) -> Tensor:
        return self.fn(a)


def as_box(box: Callable[[Tensor], Tensor] | nn.Module | None) -> nn.Module:
    """``box`` as a module: itself if it is one, :class:`nn.Identity` for None, else wrapped."""
    if box is None:
        return nn.Identity()
    if isinstance(box, nn.Module):
        return box
    return Function(box)
