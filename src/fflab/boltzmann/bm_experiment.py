"""General Boltzmann machine runs (``bm``): the glue between :mod:`fflab.boltzmann` and the
run loop.

:class:`BMExperiment` trains a Boltzmann machine with lateral connections on both layers,
small enough for exact enumeration: the central 20 x 20 box of MNIST pooled to ``side`` x
``side`` binary images (16 pixels at the default 4 x 4) and a few hidden units. It learns
from sampled statistics (data-clamped Gibbs for the positive phase, persistent chains for
the negative phase) and is judged by its exact log-likelihood, every epoch and at the end.

Everything a resumed run needs is checkpointed: parameters, momentum velocities and the
persistent chains (buffers of the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fflab.config import RunConfig
from fflab.data import Datasets, Split

from .bm import BoltzmannMachine, bm_optimizer
from .exact import MAX_EXACT_UNITS, exact_log_prob, exact_log_z
from .experiment import MomentumState, check_optimizer_settings


def pool_binary(
    x: Tensor, image_shape: tuple[int, int], side: int, threshold: float, crop: int = 0
) -> Tensor:
    """Images x (N, H*W), ``crop`` pixels cut from every border, average-pooled to
    side x side, then 1 where the mean intensity > ``threshold``.

    -> (N, side * side) float32 of 0s and 1s: the tiny binary dataset of ``bm`` runs.
    """
    h, w = image_shape
    if not 0 <= 2 * crop < min(h, w):
        raise ValueError(f"crop {crop} leaves nothing of a {h} x {w} image")
    imgs = x.reshape(x.shape[0], 1, h, w)[:, :, crop : h - crop, crop : w - crop]
    pooled = F.adaptive_avg_pool2d(imgs, side).reshape(x.shape[0], side * side)
    return (pooled > threshold).to(torch.float32)


@dataclass(frozen=True)
class BMConfig:
    """A general BM (lateral L among visibles, J among hiddens) on pooled binary images."""

    side: int = 4  # images pooled to side x side: n_visible = side ** 2
    n_hidden: int = 4
    crop: int = 4  # border pixels cut before pooling (MNIST: the central 20 x 20 box)
    pixel_threshold: float = 0.3  # a pooled pixel is on where its mean intensity exceeds this
    init_std: float = 0.01

    def __post_init__(self) -> None:
        if self.side < 1 or self.n_hidden < 1:
            raise ValueError("side and n_hidden must be >= 1")
        if self.side**2 + self.n_hidden > MAX_EXACT_UNITS:
            raise ValueError(
                f"side**2 + n_hidden = {self.side**2 + self.n_hidden} units; exact evaluation "
                f"allows at most {MAX_EXACT_UNITS}"
            )
        if not 0.0 <= self.pixel_threshold < 1.0 or self.init_std < 0 or self.crop < 0:
            raise ValueError("pixel_threshold must be in [0, 1), init_std and crop >= 0")


@dataclass(frozen=True)
class BMTrainConfig:
    """Sampled-gradient learning of a general BM (persistent chains for the negative phase).

    Positive phase: ``positive`` gibbs (``positive_sweeps`` sequential sweeps over the
    hiddens with the data clamped) or mean_field. Negative phase: ``n_chains`` persistent
    chains advanced ``negative_sweeps`` sweeps per update. Momentum SGD with weight decay
    on W, L, J; ``lr_schedule`` hinton decays lr linearly to 0 over the second half.
    """

    epochs: int = 20
    batch_size: int = 100
    lr: float = 0.05
    lr_schedule: str = "hinton"
    momentum_initial: float = 0.5
    momentum_final: float = 0.9
    momentum_switch_epoch: int = 2
    weight_decay: float = 1e-4
    positive: str = "gibbs"  # gibbs | mean_field
    positive_sweeps: int = 5
    negative_sweeps: int = 1
    n_chains: int = 100

    def __post_init__(self) -> None:
        check_optimizer_settings(self)
        if self.n_chains < 1 or self.positive_sweeps < 1 or self.negative_sweeps < 1:
            raise ValueError("n_chains, positive_sweeps and negative_sweeps must be >= 1")
        if self.positive not in ("gibbs", "mean_field"):
            raise ValueError(f"positive must be gibbs or mean_field, got {self.positive!r}")


class BMExperiment(MomentumState):
    @property
    def model(self) -> BoltzmannMachine:
        return self.bm

    def __init__(self, config: RunConfig, data: Datasets, device: torch.device, generator):
        m: BMConfig = config.model
        self.config, self.device = config, device

        def pooled(s: Split | None) -> Tensor | None:
            if s is None:
                return None
            x = pool_binary(s.x, data.image_shape, m.side, m.pixel_threshold, m.crop)
            return x.to(device)

        self.train_x, self.test_x = pooled(data.train), pooled(data.test)
        self.val_x = pooled(data.validation)
        n_visible = m.side**2
        self.bm = BoltzmannMachine(
            n_visible, m.n_hidden, init_std=m.init_std, generator=generator
        ).to(device)
        with torch.no_grad():
            mean = self.train_x.double().mean(0).clamp(1e-2, 1 - 1e-2)
            self.bm.b_v.copy_(torch.log(mean) - torch.log1p(-mean))
        t: BMTrainConfig = config.train
        self.optimizer = bm_optimizer(
            self.bm, lr=t.lr, momentum=t.momentum_initial, weight_decay=t.weight_decay
        )
        self.epochs = t.epochs
        self.samples_per_epoch = self.train_x.shape[0]

    def _logprob(self, x: Tensor) -> float:
        with torch.no_grad():
            return float(exact_log_prob(self.bm, x).mean())

    def train_epoch(self, epoch: int, generator: torch.Generator, on_batch) -> dict[str, float]:
        t = self.config.train
        lr, momentum = self.set_epoch(t, epoch)
        n = self.train_x.shape[0]
        order = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n, t.batch_size):
            v = self.train_x[order[start : start + t.batch_size].to(self.train_x.device)]
            grads = self.bm.gradient(
                v,
                generator=generator,
                positive=t.positive,
                positive_sweeps=t.positive_sweeps,
                negative_sweeps=t.negative_sweeps,
                n_chains=t.n_chains,
            )
            self.bm.apply_gradient_(grads, self.optimizer)
            on_batch(min(start + t.batch_size, n), {})
        train_lp = self._logprob(self.train_x)
        return {"loss": -train_lp, "train_logprob_exact": train_lp, "lr": lr, "momentum": momentum}

    def epoch_evaluation(self) -> dict[str, float]:
        if self.val_x is None:
            return {}
        return {"val_logprob_exact": self._logprob(self.val_x)}

    def evaluate(self) -> dict[str, Any]:
        m: BMConfig = self.config.model
        with torch.no_grad():
            log_z = float(exact_log_z(self.bm))
        out: dict[str, Any] = {
            "test_logprob_exact": self._logprob(self.test_x),
            "train_logprob_exact": self._logprob(self.train_x),
            "log_z_exact": log_z,
            # the uniform model over the pooled images: a floor every trained BM should beat
            "uniform_logprob": -self.bm.n_visible * math.log(2.0),
            "n_visible": self.bm.n_visible,
            "n_hidden": self.bm.n_hidden,
            "binarize": f"crop {m.crop}, pool to {m.side}x{m.side}, > {m.pixel_threshold} "
            f"(data.binarize={self.config.data.binarize})",
        }
        if self.val_x is not None:
            out["val_logprob_exact"] = self._logprob(self.val_x)
        return out


def bm_model(model: BMConfig) -> BoltzmannMachine:
    """A Boltzmann machine of the configured size (weights as initialized, to be loaded)."""
    return BoltzmannMachine(model.side**2, model.n_hidden, init_std=model.init_std)


def build_bm(config: RunConfig, data: Datasets, device: torch.device, generator) -> BMExperiment:
    return BMExperiment(config, data, device, generator)
