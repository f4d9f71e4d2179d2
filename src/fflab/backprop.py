"""The backprop twin: FF's architecture trained end to end with softmax cross-entropy.

Same layers (Linear + ReLU, weights N(0, 1/fan_in)), same RMS normalization of the input and
between layers, same input (the image with the neutral label written over it, or the bare
image); a linear softmax layer reads the last hidden layer. It is the baseline that FF's
accuracy and speed are compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fflab.checkpoint import flatten_optimizer, unflatten_optimizer
from fflab.config import RunConfig
from fflab.data import Datasets, Split
from fflab.ff.functional import embed_label, rms_normalize
from fflab.optim import FUSED_SGD, lr_factor


@dataclass(frozen=True)
class BPNetConfig:
    in_features: int = 784
    num_classes: int = 10
    hidden: tuple[int, ...] = (1000, 1000, 1000)
    label_input: str = "neutral"  # neutral (overlay 0.1 on the label pixels, as FF's) | none

    def __post_init__(self) -> None:
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"hidden must be a non-empty list of positive sizes, got {self.hidden}"
            )
        if self.label_input not in ("neutral", "none"):
            raise ValueError(f"label_input must be neutral or none, got {self.label_input!r}")


@dataclass(frozen=True)
class BPTrainConfig:
    epochs: int = 20
    batch_size: int = 100
    optimizer: str = "sgd"  # sgd (classic momentum) | adam
    lr: float = 0.01
    momentum: float = 0.9
    weight_cost: float = 0.0
    lr_schedule: str = "hinton"  # hinton (constant, then linear decay) | constant
    log_test_error: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.lr_schedule not in ("hinton", "constant"):
            raise ValueError(f"lr_schedule must be hinton or constant, got {self.lr_schedule!r}")


class BPNet(nn.Module):
    def __init__(self, config: BPNetConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        widths = (config.in_features, *config.hidden)
        self.layers = nn.ModuleList(
            nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:], strict=True)
        )
        self.out = nn.Linear(config.hidden[-1], config.num_classes)
        for m in (*self.layers, self.out):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features), generator)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C) of images x (B, D)."""
        c = self.config
        if c.label_input == "neutral":
            neutral = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
            x = embed_label(x, neutral, c.num_classes, "overlay")
        h = x
        for layer in self.layers:
            h = torch.relu(layer(rms_normalize(h)))
        return self.out(rms_normalize(h))


@torch.no_grad()
def error_rate(net: BPNet, split: Split, batch_size: int) -> float:
    wrong = 0
    for i in range(0, len(split), batch_size):
        wrong += int(
            (net(split.x[i : i + batch_size]).argmax(1) != split.y[i : i + batch_size]).sum()
        )
    return 100.0 * wrong / max(len(split), 1)


def make_optimizer(net: nn.Module, t: BPTrainConfig) -> torch.optim.Optimizer:
    """Adam, or SGD with classic momentum (torch's fused kernel where it runs: torch >= 2.4).

    Build it after the net is on its device.
    """
    if t.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=t.lr, weight_decay=t.weight_cost)
    params = list(net.parameters())
    fused = FUSED_SGD and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.SGD(
        params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_cost, fused=fused or None
    )


class BPExperiment:
    def __init__(self, config: RunConfig, data: Datasets, device: torch.device, generator):
        self.config, self.data = config, data
        self.net = BPNet(config.model, generator).to(device)
        t = config.train
        self.optimizer = make_optimizer(self.net, t)
        self.epochs = t.epochs
        self.samples_per_epoch = len(data.train)

    def train_epoch(self, epoch: int, generator: torch.Generator, on_batch) -> dict[str, float]:
        t = self.config.train
        lr = t.lr * lr_factor(epoch, t.epochs, t.lr_schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = self.data.train.x, self.data.train.y
        n = x.shape[0]
        order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
        total = torch.zeros((), device=x.device)
        batches = 0
        self.net.train()
        for start in range(0, n, t.batch_size):
            idx = order[start : start + t.batch_size]
            loss = F.cross_entropy(self.net(x[idx]), y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
            batches += 1
            on_batch(min(start + t.batch_size, n), {"loss": float(loss.detach())})
        return {"loss": float(total / batches), "lr": lr}

    def epoch_evaluation(self) -> dict[str, float]:
        bs, out = self.config.data.eval_batch_size, {}
        if self.data.validation is not None:
            out["val_error"] = error_rate(self.net, self.data.validation, bs)
        if self.config.train.log_test_error:
            out["test_error"] = error_rate(self.net, self.data.test, bs)
        return out

    def evaluate(self) -> dict[str, Any]:
        bs = self.config.data.eval_batch_size
        self.net.eval()
        out = {
            "test_error": error_rate(self.net, self.data.test, bs),
            "train_error": error_rate(self.net, self.data.train, bs),
        }
        if self.data.validation is not None:
            out["val_error"] = error_rate(self.net, self.data.validation, bs)
        return out

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer)
        return {**tensors, **opt_tensors}, {"optimizer": opt_meta}

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        unflatten_optimizer(self.optimizer, tensors, meta["optimizer"])

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.net.parameters())


def build(config: RunConfig, data: Datasets, device: torch.device, generator) -> BPExperiment:
    return BPExperiment(config, data, device, generator)
