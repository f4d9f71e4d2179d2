"""What the RBM and BM runs share: checkpointed momentum state, schedules, checks.

The runs themselves live in :mod:`fflab.boltzmann.rbm_experiment` and
:mod:`fflab.boltzmann.bm_experiment`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fflab.optim import VELOCITY, MomentumSGD, lr_factor

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
    """What the Boltzmann adapters share: the epoch's lr and momentum, and the checkpoint of
    the model and its momentum velocities.

    A subclass names its model in ``model`` and keeps its :class:`~fflab.optim.MomentumSGD`
    in ``self.optimizer``. The velocities are saved as ``velocity.<parameter name>``; the
    optimizer's settings come from the run's config.
    """

    optimizer: MomentumSGD

    @property
    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def set_epoch(self, t, epoch: int) -> tuple[float, float]:
        """Set the optimizer's lr and momentum for 0-based ``epoch`` of train config ``t``;
        returns them."""
        lr, momentum = lr_and_momentum(t, epoch)
        for group in self.optimizer.param_groups:
            group.update(lr=lr, momentum=momentum)
        return lr, momentum

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state = self.optimizer.state
        for name, p in self.model.named_parameters():
            if p in state and VELOCITY in state[p]:
                tensors[f"velocity.{name}"] = state[p][VELOCITY]
        return tensors, {}

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.state.clear()
        for name, p in self.model.named_parameters():
            v = tensors.get(f"velocity.{name}")
            if v is not None:
                self.optimizer.state[p][VELOCITY] = v.clone()

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
