"""Optimizers and learning-rate schedules shared by the training loops."""

from __future__ import annotations

import torch


class SmoothedSGD(torch.optim.Optimizer):
    """SGD on an exponentially smoothed gradient, as in Hinton's FF and RBM code.

    ``inc = momentum * inc + (1 - momentum) * grad`` then ``p -= lr * (inc + weight_decay * p)``.
    Unlike ``torch.optim.SGD`` the smoothing is an average (the step does not grow by
    ``1 / (1 - momentum)``) and the weight cost is applied outside it.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "inc" not in self.state[p]:
                    self.state[p]["inc"] = torch.zeros_like(p)
            incs = [self.state[p]["inc"] for p in params]
            torch._foreach_mul_(incs, mom)
            torch._foreach_add_(incs, [p.grad for p in params], alpha=1 - mom)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)  # p -= lr * wd * p
            torch._foreach_add_(params, incs, alpha=-lr)
        return None


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
