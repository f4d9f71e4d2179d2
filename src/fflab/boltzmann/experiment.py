"""What the RBM and BM runs share: checkpointed momentum state, schedules, checks.

The runs themselves live in :mod:`fflab.boltzmann.rbm_experiment` and
:mod:`fflab.boltzmann.bm_experiment`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fflab.optim import lr_factor

from .train import momentum_schedule


def is_binary(x: Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def check_optimizer_settings(t) -> None:
    """Check the settings every Boltzmann train config ``t`` shares: epochs, batch size, the
    learning rate and its schedule, the two momenta and their switch, the weight decay."""
    if t.epochs < 1 or t.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if not t.lr > 0:
        raise ValueError(f"lr must be > 0, got {t.lr!r}")
    if t.lr_schedule not in ("constant", "hinton"):
        raise ValueError(f"lr_schedule must be constant or hinton, got {t.lr_schedule!r}")
    for name in ("momentum_initial", "momentum_final"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(t, name)!r}")
    if t.weight_decay < 0 or t.momentum_switch_epoch < 0:
        raise ValueError("weight_decay and momentum_switch_epoch must be >= 0")


class MomentumState:
    """Checkpoint hooks shared by the Boltzmann adapters: the model and its momentum velocity.

    A subclass names its model in ``model`` and keeps its velocities in ``self.velocity``.
    """

    velocity: dict[str, Tensor]

    @property
    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"velocity.{k}": v for k, v in self.velocity.items()})
        return tensors, {}

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.velocity = {k[9:]: v.clone() for k, v in tensors.items() if k.startswith("velocity.")}

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())


def lr_and_momentum(t, epoch: int) -> tuple[float, float]:
    """Learning rate and momentum of 0-based ``epoch`` under an RBM or BM train config ``t``."""
    lr = t.lr * lr_factor(epoch, t.epochs, t.lr_schedule)
    momentum = momentum_schedule(
        epoch,
        initial=t.momentum_initial,
        final=t.momentum_final,
        switch_epoch=t.momentum_switch_epoch,
    )
    return lr, momentum
