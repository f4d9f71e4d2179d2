"""FF layers: the protocol every layer type follows, and the dense layer.

An FF layer maps its (RMS-normalized) input ``h`` (N, in_features) to a total input ``z`` (N,
out_features); its activities are ``relu(z)`` and its goodness a function of them. Learning is
local: the trainer works out ``dz = dL/dz`` of the layer's own loss, and the layer turns it into
the gradients of its own parameters. No layer ever computes a gradient with respect to its
input, so nothing flows from one layer to another.

The protocol (:class:`FFLayer`):

- ``forward(h) -> z``: differentiable with autograd (the reference trainer relies on it);
- ``local_grad(h, dz, sink)``: hand each parameter's gradient, for the batch of rows ``h`` with
  ``dz`` (N, out_features), to ``sink``;
- ``in_features``, ``out_features``.

A *sink* is where gradients go: ``sink(param, a, b=None, columns=slice(None))`` says that the
gradient of ``param[..., columns]`` is ``a @ b`` (or ``a`` itself when ``b`` is None). The
trainer's sinks either write ``param.grad`` or fold the product straight into the optimizer's
smoothed gradient (one GEMM, see :class:`fflab.optim.SmoothedSGD`). Dense layers are here;
locally connected ones in :mod:`fflab.ff.local`; a convolutional layer would be a third class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

GradSink = Callable[..., None]  # sink(param, a, b=None, columns=slice(None))


class FFLayer(Protocol):
    in_features: int
    out_features: int

    def forward(self, h: Tensor) -> Tensor: ...

    def local_grad(self, h: Tensor, dz: Tensor, sink: GradSink) -> None: ...


class Dense(nn.Linear):
    """Fully connected FF layer: ``z = h W' + b``, W (out, in) ~ N(0, 1/in), b = 0 (Hinton's).

    ``bias=False`` makes ``z = h W'`` (a recurrent net's top-down weights, whose layer already
    has the bias of its bottom-up weights).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        generator: torch.Generator | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        with torch.no_grad():
            nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(in_features), generator)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def local_grad(self, h: Tensor, dz: Tensor, sink: GradSink) -> None:
        """dL/dW = dz' h (one product over all N rows), dL/db = sum of dz: (N, in), (N, out)."""
        sink(self.weight, dz.T, h)
        if self.bias is not None:
            sink(self.bias, dz.sum(0))


def write_grad(param: Tensor, a: Tensor, b: Tensor | None = None, columns=slice(None)) -> None:
    """The plain sink: write the gradient ``a @ b`` (or ``a``) into ``param.grad[..., columns]``.

    ``param.grad`` is allocated once and every column is overwritten on each step.
    """
    if param.grad is None:
        param.grad = torch.empty_like(param)
    if b is None:
        param.grad[..., columns] = a
    else:
        torch.mm(a, b, out=param.grad[:, columns])
