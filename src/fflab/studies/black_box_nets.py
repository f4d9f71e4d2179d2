"""The black-box study's nets: FF with boxes between its layers, and backprop through the same
boxes by a straight-through estimator; the training loops for both.

*FF* trains the boxed net unchanged with the fast :class:`fflab.ff.train.FFTrainer`, which
applies the boxes as the autograd :class:`fflab.ff.reference.ReferenceTrainer` does (the tests
hold the two equal): every layer learns from its own loss, with the box's output as a
constant input, so the box's derivative is never needed.

*Backprop* needs a gradient through every box. Rounding and table lookups have derivative 0
almost everywhere, and a numpy function has none that autograd can see, so the baseline uses a
surrogate: the **straight-through estimator (STE)**, which passes the gradient with respect
to a box's output unchanged to its input (the identity as the box's Jacobian). A box that
knows its exact vector-Jacobian product (``box.vjp``; here the signed permutation, whose
Jacobian is its own matrix, so ``vjp`` is its transpose) gets that instead: for it the
baseline's gradient is exact, not a surrogate. Without a surrogate (``gradient="autograd"``,
autograd as it is) every other box here cuts the gradient: the quantizer's and the tables'
integer levels and the numpy round trip leave autograd no path back, so the layers below a box
never learn.

Shapes: ``B`` batch, ``D`` input features, ``C`` classes, ``H_l`` units of hidden layer ``l``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fflab.backprop import BPNet, BPNetConfig, BPTrainConfig
from fflab.backprop import error_rate as bp_error_rate
from fflab.data import Datasets, Split
from fflab.ff.boxes import LookupTable, NumpyFunction, Quantizer, SignedPermutation, as_box
from fflab.ff.experiment import error_rate as ff_error_rate
from fflab.ff.functional import rms_normalize
from fflab.ff.model import FFNet
from fflab.ff.train import FFTrainConfig, FFTrainer
from fflab.optim import MomentumSGD, lr_factor

# the boxes of the study, by name: what each gap of the net holds (none: the plain net)
BOX_KINDS = ("none", "quantize4", "permutation", "numpy-tanh", "lut-monotone", "lut-random")


def make_boxes(kind: str, hidden: Sequence[int], generator: torch.Generator) -> list[nn.Module]:
    """One box of ``kind`` per gap between consecutive hidden layers (L - 1 of them).

    ``quantize4``: 4 bits (16 levels) on [0, 4]; ``permutation``: a signed permutation of the
    gap's units; ``numpy-tanh``: ``np.tanh`` computed by numpy; ``lut-monotone`` /
    ``lut-random``: 256 levels on [0, 4] read through a random sorted / unsorted table of
    values in [0, 1). Random parts are drawn from ``generator``, gap by gap.
    """
    gaps = list(hidden[:-1])
    if kind == "none":
        return [nn.Identity() for _ in gaps]
    if kind == "quantize4":
        return [Quantizer(4, 0.0, 4.0) for _ in gaps]
    if kind == "permutation":
        return [SignedPermutation(h, generator) for h in gaps]
    if kind == "numpy-tanh":
        return [NumpyFunction(np.tanh, "np.tanh") for _ in gaps]
    if kind in ("lut-monotone", "lut-random"):
        mono = kind == "lut-monotone"
        return [LookupTable.random(generator, 256, 0.0, 4.0, monotone=mono) for _ in gaps]
    raise ValueError(f"unknown box {kind!r}; choose one of {', '.join(BOX_KINDS)}")


class _ThroughBox(torch.autograd.Function):
    """``box(a)`` forward; backward ``box.vjp(grad)`` if the box has one, else ``grad`` (STE)."""

    @staticmethod
    def forward(ctx, a: Tensor, box: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.box = box
        with torch.no_grad():
            return box(a.detach())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        vjp = getattr(ctx.box, "vjp", None)
        return (grad if vjp is None else vjp(grad)), None


def through_box(box: Callable[[Tensor], Tensor], a: Tensor) -> Tensor:
    """``box(a)`` (N, H) -> (N, H) with a surrogate gradient for backprop: the box's exact
    ``vjp`` where it has one, else the straight-through estimator (identity)."""
    return _ThroughBox.apply(a, box)


def surrogate(box: nn.Module) -> str:
    """How backprop gets through ``box``: ``exact transpose`` (a ``vjp``), ``none needed``
    (the identity) or ``STE (identity)``."""
    if isinstance(box, nn.Identity):
        return "none needed"
    return "exact transpose" if hasattr(box, "vjp") else "STE (identity)"


class BoxedBPNet(nn.Module):
    """:class:`fflab.backprop.BPNet` with a box in every gap between hidden layers.

    The layers are a BPNet's (built from ``config`` and ``generator``, so the weights start
    equal to the plain twin's): Linear + ReLU with RMS normalization of the input and between
    layers, a linear softmax layer on the normalized last hidden layer. Box ``l`` maps layer
    ``l``'s activities before layer ``l + 1`` normalizes them, as in an FF net; backward goes
    through it by :func:`through_box` (``gradient="surrogate"``) or by whatever autograd finds
    in the box's own operations (``gradient="autograd"``: nothing, for every box here but the
    permutation). Trained by autograd (BPNet's hand-derived step does not know boxes).
    """

    def __init__(
        self,
        config: BPNetConfig,
        generator: torch.Generator | None = None,
        between: Sequence[Callable[[Tensor], Tensor] | nn.Module | None] | None = None,
        gradient: str = "surrogate",
    ) -> None:
        super().__init__()
        if gradient not in ("surrogate", "autograd"):
            raise ValueError(f"gradient must be surrogate or autograd, got {gradient!r}")
        self.gradient = gradient
        base = BPNet(config, generator)
        self.config = config
        self.layers, self.out = base.layers, base.out
        boxes = [None] * (len(config.hidden) - 1) if between is None else list(between)
        if len(boxes) != len(config.hidden) - 1:
            raise ValueError(
                f"between needs one box (or None) per gap between hidden layers: "
                f"{len(config.hidden) - 1} for {len(config.hidden)} layers, got {len(boxes)}"
            )
        self.between = nn.ModuleList(as_box(b) for b in boxes)

    def activities(self, x: Tensor) -> list[Tensor]:
        """Every hidden layer's ReLU activities (before its box) for images x (B, D)."""
        h = BPNet.input(self, x)  # (B, D): the neutral label written in, or the bare image
        out = []
        for i, layer in enumerate(self.layers):
            a = torch.relu(layer(rms_normalize(h)))  # (B, H_i)
            out.append(a)
            if i + 1 < len(self.layers):
                box = self.between[i]
                if isinstance(box, nn.Identity):
                    h = a
                else:
                    h = through_box(box, a) if self.gradient == "surrogate" else box(a)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C) of images x (B, D)."""
        return self.out(rms_normalize(self.activities(x)[-1]))


def _order(n: int, seed: int, epoch: int, device: torch.device) -> tuple[Tensor, torch.Generator]:
    """The epoch's generator (the run loop's seeding) and its shuffled order of n rows."""
    from fflab.runs import epoch_generator

    g = epoch_generator(seed, epoch, torch.device("cpu"))
    return torch.randperm(n, generator=g).to(device), g


TRAIN_EVAL_ROWS = 10_000  # training error is measured on the first 10,000 training images


def _train_rows(data: Datasets) -> Split:
    return Split(data.train.x[:TRAIN_EVAL_ROWS], data.train.y[:TRAIN_EVAL_ROWS])


def train_ff(
    net: FFNet,
    cfg: FFTrainConfig,
    data: Datasets,
    seed: int,
    eval_batch_size: int = 1000,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Train ``net`` (boxes or not) with the fast FF step; returns its errors
    (test, and training on the first 10,000 training images) and per-epoch losses. A
    non-finite epoch loss stops training (``diverged``); the net is evaluated as it is.

    The loop of :meth:`fflab.ff.train.FFTrainer.train_epoch`: each epoch a shuffled pass in
    minibatches with the run loop's epoch generator, the learning rate scaled by the schedule.
    Only the simultaneous layer schedule (every layer, every batch) is supported.
    """
    if cfg.layer_schedule != "simultaneous":
        raise ValueError("the black-box FF loop trains every layer on every batch (simultaneous)")
    trainer = FFTrainer(net, cfg)
    x, y = data.train.x, data.train.y
    losses = []
    for epoch in range(cfg.epochs):
        trainer.set_lr_factor(lr_factor(epoch, cfg.epochs, cfg.lr_schedule))
        order, g = _order(x.shape[0], seed, epoch, x.device)
        net.train()
        total, batches = x.new_zeros(()), 0
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            total += trainer.step(x[idx], y[idx], g)[:, 0].sum()  # no read back per step
            batches += 1
        losses.append(float(total) / batches)
        log(f"  epoch {epoch + 1}/{cfg.epochs}: FF loss {losses[-1]:.4f}")
        if not np.isfinite(losses[-1]):
            log(f"  FF training diverged in epoch {epoch + 1}: stopped there")
            break
    net.eval()
    return {
        "diverged": not np.isfinite(losses[-1]),
        "test_error_goodness": ff_error_rate(net, data.test, "goodness", eval_batch_size),
        "test_error_softmax": ff_error_rate(net, data.test, "softmax", eval_batch_size),
        "train_error_goodness": ff_error_rate(net, _train_rows(data), "goodness", eval_batch_size),
        "loss": losses,
    }


def train_bp(
    net: BoxedBPNet,
    cfg: BPTrainConfig,
    data: Datasets,
    seed: int,
    eval_batch_size: int = 1000,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Train ``net`` by autograd on the cross-entropy (momentum SGD or Adam, as
    :class:`fflab.backprop.BPExperiment`); returns its errors and per-epoch losses (a
    non-finite loss stops training, as in :func:`train_ff`)."""
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_cost
        )
    else:
        opt = MomentumSGD(
            net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_cost
        )
    x, y = data.train.x, data.train.y
    losses = []
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(epoch, cfg.epochs, cfg.lr_schedule)
        order, _ = _order(x.shape[0], seed, epoch, x.device)
        net.train()
        total, batches = 0.0, 0
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        losses.append(total / batches)
        log(f"  epoch {epoch + 1}/{cfg.epochs}: cross-entropy {losses[-1]:.4f}")
        if not np.isfinite(losses[-1]):
            log(f"  backprop diverged in epoch {epoch + 1}: stopped there")
            break
    net.eval()
    return {
        "diverged": not np.isfinite(losses[-1]),
        "test_error": bp_error_rate(net, data.test, eval_batch_size),
        "train_error": bp_error_rate(net, _train_rows(data), eval_batch_size),
        "loss": losses,
    }
