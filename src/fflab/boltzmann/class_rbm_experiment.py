"""Classification-RBM runs (``class-rbm``): the glue between :mod:`fflab.boltzmann.class_rbm`
and the run loop.

:class:`ClassRBMExperiment` trains a :class:`~fflab.boltzmann.class_rbm.ClassRBM` on images
with pixel values in [0, 1] and their labels, by the discriminative, generative (CD-k) or
hybrid objective, with the momentum SGD of :class:`~fflab.optim.MomentumSGD` in the RBM
guide's convention (``velocity = momentum * velocity + lr * (grad + weight_decay * p)``,
``p -= velocity``; weight decay on W and U only). Per epoch it logs the mean ``-log p(y | v)``
of the training batches (``loss``); the final evaluation gives the test error of
free-energy scoring (the label of least F(v, y)) and the test ``-log p(y | v)``.

The checkpoint holds the parameters and the momentum velocities (the epoch's lr and momentum
come from the config), so a resumed run makes the draws an uninterrupted one makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fflab.config import RunConfig
from fflab.data import Datasets, Split
from fflab.optim import MomentumSGD

from ._checks import check_generator
from .class_rbm import (
    ClassRBM,
    cd_gradient,
    class_log_probs,
    discriminative_gradient,
    hybrid_gradient,
)
from .experiment import MomentumState, check_optimizer_settings

OBJECTIVES = ("discriminative", "generative", "hybrid")
# the generative objective's loss (-log p(y | v)) costs a pass its update does not need: it is
# taken on 1 batch in 10, as the RBM trainer takes its monitors
MONITOR_EVERY = 10


@dataclass(frozen=True)
class ClassRBMConfig:
    n_visible: int = 784
    n_hidden: int = 500
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.n_visible < 1 or self.n_hidden < 1:
            raise ValueError("n_visible and n_hidden must be >= 1")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")


@dataclass(frozen=True)
class ClassRBMTrainConfig:
    """How a classification RBM learns.

    ``objective``: discriminative (``-log p(y | v)``, exact gradient), generative
    (``-log p(v, y)``, CD-``k``) or hybrid (``-log p(y | v) - alpha log p(v, y)``). The update
    is :func:`class_rbm_optimizer`'s, momentum ``momentum_initial`` for the first
    ``momentum_switch_epoch`` epochs, then ``momentum_final``; ``lr_schedule`` hinton keeps lr
    for the first half of training and decays it linearly over the second half.
    ``log_test_error``: also measure the test error after every evaluated epoch.
    """

    objective: str = "discriminative"
    alpha: float = 0.01
    k: int = 1
    epochs: int = 30
    batch_size: int = 100
    lr: float = 0.2
    lr_schedule: str = "hinton"
    momentum_initial: float = 0.5
    momentum_final: float = 0.9
    momentum_switch_epoch: int = 5
    weight_decay: float = 0.0
    log_test_error: bool = False

    def __post_init__(self) -> None:
        check_optimizer_settings(self)
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


def class_rbm_optimizer(
    rbm: ClassRBM, *, lr: float, momentum: float = 0.5, weight_decay: float = 0.0
) -> MomentumSGD:
    """Momentum descent in the RBM guide's convention, ``v = m v + lr (g + wd p)``, ``p -= v``,
    with weight decay on W and U only (group 0), none on the biases (group 1)."""
    groups = [
        {"params": [rbm.W, rbm.U], "weight_decay": weight_decay},
        {"params": [rbm.b, rbm.c, rbm.d], "weight_decay": 0.0},
    ]
    return MomentumSGD(groups, lr=lr, momentum=momentum, lr_in_velocity=True)


@torch.no_grad()
def class_rbm_train_epoch(
    rbm: ClassRBM,
    split: Split,
    *,
    optimizer: MomentumSGD,
    objective: str = "discriminative",
    alpha: float = 0.01,
    k: int = 1,
    batch_size: int = 100,
    generator: torch.Generator,
    on_batch=None,
) -> dict[str, float]:
    """One pass over ``split`` in a random order drawn from ``generator``; returns the mean
    ``-log p(y | v)`` of the batches it was measured on (every batch for the discriminative
    and hybrid objectives, whose update computes it; 1 in 10 for the generative one)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    check_generator(generator)
    params = dict(rbm.named_parameters())
    W, U, b, c, d = rbm.params()
    x, y = split.x, split.y
    n = x.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    measured = 0
    for i, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]
        v, labels = x[idx].to(device=W.device, dtype=W.dtype), y[idx].to(W.device)
        log_p = None
        if objective == "discriminative":
            grads, log_p = discriminative_gradient(v, labels, W, U, b, c, d)
        elif objective == "hybrid":
            grads, log_p = hybrid_gradient(
                v, labels, W, U, b, c, d, alpha=alpha, k=k, generator=generator
            )
        else:
            if i % MONITOR_EVERY == 0:
                log_p = class_log_probs(v, W, U, b, c, d)
            grads = cd_gradient(v, labels, W, U, b, c, d, k=k, generator=generator).grads
        if log_p is not None:
            total -= log_p.gather(1, labels[:, None]).sum().double()
            measured += v.shape[0]
        for name, g in grads.items():
            optimizer.fold_(params[name], g)
        optimizer.step()
        if on_batch is not None:
            done = min(start + batch_size, n)
            on_batch(done, lambda t=total, m=measured: {"loss": float(t) / max(m, 1)})
    return {"loss": float(total) / max(measured, 1), "samples": float(n)}


@torch.no_grad()
def error_rate(rbm: ClassRBM, split: Split, batch_size: int = 1000) -> tuple[float, float]:
    """(error in percent of free-energy scoring, mean ``-log p(y | v)``) on ``split``."""
    wrong, nll = 0, 0.0
    params = rbm.params()
    for i in range(0, len(split), batch_size):
        v = split.x[i : i + batch_size].to(rbm.W)
        y = split.y[i : i + batch_size].to(rbm.W.device)
        log_p = class_log_probs(v, *params)
        wrong += int((log_p.argmax(1) != y).sum())
        nll -= float(log_p.gather(1, y[:, None]).sum())
    n = max(len(split), 1)
    return 100.0 * wrong / n, nll / n


class ClassRBMExperiment(MomentumState):
    @property
    def model(self) -> ClassRBM:
        return self.rbm

    def __init__(self, config: RunConfig, data: Datasets, device: torch.device, generator):
        m: ClassRBMConfig = config.model
        t: ClassRBMTrainConfig = config.train
        if data.train.x.shape[1] != m.n_visible:
            raise ValueError(
                f"model.n_visible is {m.n_visible} but the images have {data.train.x.shape[1]} "
                "pixels"
            )
        if data.num_classes > m.num_classes:
            raise ValueError(
                f"model.num_classes is {m.num_classes} but the data has {data.num_classes} classes"
            )
        for name, split in (("training", data.train), ("test", data.test)):
            if not bool(((split.x >= 0) & (split.x <= 1)).all()):
                raise ValueError(f"a class-rbm run needs {name} pixel values in [0, 1]")
        self.config, self.data, self.device = config, data, device
        self.rbm = ClassRBM(m.n_visible, m.n_hidden, m.num_classes, generator=generator)
        self.rbm.to(device)
        self.optimizer = class_rbm_optimizer(
            self.rbm, lr=t.lr, momentum=t.momentum_initial, weight_decay=t.weight_decay
        )
        self.epochs = t.epochs
        self.samples_per_epoch = len(data.train)

    def train_epoch(self, epoch: int, generator: torch.Generator, on_batch) -> dict[str, float]:
        t = self.config.train
        lr, momentum = self.set_epoch(t, epoch)
        stats = class_rbm_train_epoch(
            self.rbm,
            self.data.train,
            optimizer=self.optimizer,
            objective=t.objective,
            alpha=t.alpha,
            k=t.k,
            batch_size=t.batch_size,
            generator=generator,
            on_batch=on_batch,
        )
        return {"loss": stats["loss"], "lr": lr, "momentum": momentum}

    def epoch_evaluation(self) -> dict[str, float]:
        bs, out = self.config.data.eval_batch_size, {}
        if self.data.validation is not None:
            out["val_error"], out["val_nll"] = error_rate(self.rbm, self.data.validation, bs)
        if self.config.train.log_test_error:
            out["test_error"] = error_rate(self.rbm, self.data.test, bs)[0]
        return out

    def evaluate(self) -> dict[str, Any]:
        bs = self.config.data.eval_batch_size
        test_error, test_nll = error_rate(self.rbm, self.data.test, bs)
        out: dict[str, Any] = {
            "test_error": test_error,
            "test_nll": test_nll,
            "train_error": error_rate(self.rbm, self.data.train, bs)[0],
            "objective": self.config.train.objective,
            "n_hidden": self.rbm.n_hidden,
        }
        if self.data.validation is not None:
            out["val_error"] = error_rate(self.rbm, self.data.validation, bs)[0]
        return out


def build_class_rbm(
    config: RunConfig, data: Datasets, device: torch.device, generator
) -> ClassRBMExperiment:
    return ClassRBMExperiment(config, data, device, generator)


def class_rbm_model(model: ClassRBMConfig) -> ClassRBM:
    """A classification RBM of the configured size (weights as initialized, to be loaded)."""
    return ClassRBM(model.n_visible, model.n_hidden, model.num_classes)


def load_class_rbm(run_dir: Path, device: torch.device | str = "cpu") -> ClassRBM:
    """The classification RBM of a ``class-rbm`` run directory's checkpoint."""
    from fflab.api import load_run

    model = load_run(run_dir, device)
    if not isinstance(model, ClassRBM):
        raise ValueError(f"{run_dir} is not a class-rbm run")
    return model
