"""Optimizers and learning-rate schedules shared by the training loops."""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd as _functional_sgd

FUSED_SGD = torch.__version__ >= "2.4"  # torch's fused SGD kernel runs on CPU from 2.4 on


class SmoothedSGD(torch.optim.Optimizer):
    """SGD on an exponentially smoothed gradient, as in Hinton's FF and RBM code.

    ``inc = momentum * inc + (1 - momentum) * grad`` then ``p -= lr * (inc + weight_decay * p)``.
    Unlike ``torch.optim.SGD`` the smoothing is an average (the step does not grow by
    ``1 / (1 - momentum)``) and the weight cost is applied outside it.

    A gradient that is a matrix product ``a @ b`` can be folded into ``inc`` by
    :meth:`fold_product_` instead of being stored in ``p.grad``: one GEMM with ``beta =
    momentum`` replaces writing the gradient and two passes over it and ``inc``, which for
    large layers are memory-bound. ``step`` then updates folded parameters without smoothing
    them again.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self._folded: set[int] = set()  # ids of parameters whose gradient is already in inc

    def _momentum(self, p: torch.Tensor) -> float:
        # looked up each time: load_state_dict replaces the group dicts
        return next(g["momentum"] for g in self.param_groups if any(q is p for q in g["params"]))

    def _inc(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "inc" not in state:
            state["inc"] = torch.zeros_like(p)
        return state["inc"]

    @torch.no_grad()
    def fold_product_(
        self, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, columns: slice = slice(None)
    ) -> None:
        """Smooth the gradient ``a @ b`` of ``p[:, columns]`` into ``inc`` in one GEMM.

        a: (rows of p, n), b: (n, len(columns)). Every column of ``p`` must be folded (by this
        or :meth:`fold_`) before the next :meth:`step`, and ``p.grad`` must be None.
        """
        mom = self._momentum(p)
        self._inc(p)[:, columns].addmm_(a, b, beta=mom, alpha=1 - mom)
        self._folded.add(id(p))

    @torch.no_grad()
    def fold_(self, p: torch.Tensor, grad: torch.Tensor, columns: slice = slice(None)) -> None:
        """Smooth a gradient ``grad`` of ``p[..., columns]`` into ``inc`` (small blocks, biases)."""
        mom = self._momentum(p)
        self._inc(p)[..., columns].lerp_(grad, 1 - mom)
        self._folded.add(id(p))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            folded = [p for p in group["params"] if id(p) in self._folded]
            fresh = [p for p in group["params"] if p.grad is not None and id(p) not in self._folded]
            if fresh:
                incs = [self._inc(p) for p in fresh]
                torch._foreach_mul_(incs, mom)
                torch._foreach_add_(incs, [p.grad for p in fresh], alpha=1 - mom)
            params = folded + fresh
            if params:
                _decay_and_step_(params, [self.state[p]["inc"] for p in params], lr, wd)
        self._folded.clear()
        return None


def _decay_and_step_(params: list, incs: list, lr: float, wd: float) -> None:
    """``p -= lr * (inc + wd * p)`` for every parameter, in one pass over memory.

    That is plain SGD without momentum on the "gradient" ``inc``, which torch's fused SGD
    kernel does in one read of ``p`` and ``inc`` (two foreach passes otherwise).
    """
    fused = FUSED_SGD and all(p.device.type in ("cpu", "cuda") for p in params)
    hyper = {"weight_decay": wd, "momentum": 0.0, "lr": lr, "dampening": 0.0}
    hyper.update(nesterov=False, maximize=False)
    if fused and len({(p.device, p.dtype) for p in params}) == 1:
        # the kernel itself: torch.optim's wrapper regroups by device and dtype on every call
        torch._fused_sgd_(params, incs, [], is_first_step=False, **hyper)
        return
    foreach = None if fused else True
    _functional_sgd(params, incs, [None] * len(params), fused=fused, foreach=foreach, **hyper)


def hinton_lr_factor(epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of Hinton's FF code for 0-based ``epoch`` of ``epochs``.

    1 for the first half of training, then ``(1 + 2 * (epochs - epoch - 1)) / epochs``, falling
    linearly to ``1 / epochs`` in the last epoch.
    """
    if epoch + 1 <= epochs / 2:
        return 1.0
    return (1 + 2 * (epochs - epoch - 1)) / epochs


def lr_factor(epoch: int, epochs: int, schedule: str) -> float:
    """Learning-rate multiplier for 0-based ``epoch``: ``hinton`` or ``constant``."""
    if schedule == "constant":
        return 1.0
    if schedule == "hinton":
        return hinton_lr_factor(epoch, epochs)
    raise ValueError(f"unknown lr schedule {schedule!r}; choose hinton or constant")
