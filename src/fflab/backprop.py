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
from fflab.ff.functional import embed_label, rms_normalize, rms_normalize_backward, rms_scale
from fflab.optim import MomentumSGD, lr_factor


@dataclass(frozen=True)
class BPNetConfig:
    in_features: int = 784
    num_classes: int = 10
    hidden: tuple[int, ...] = (1000, 1000, 1000)
    # none (the input as it is) | neutral (0.1 written over the first num_classes features,
    # what an FF net with label_mode=overlay sees in its neutral pass: MNIST's blank border)
    label_input: str = "none"

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

    def input(self, x: Tensor) -> Tensor:
        """The first layer's input (B, D) for images x (B, D): the neutral label written over
        the label pixels, or the bare image."""
        c = self.config
        if c.label_input == "neutral":
            neutral = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
            x = embed_label(x, neutral, c.num_classes, "overlay")
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C) of images x (B, D)."""
        h = self.input(x)
        for layer in self.layers:
            h = torch.relu(layer(rms_normalize(h)))
        return self.out(rms_normalize(h))


@torch.no_grad()
def hand_backward_(net: BPNet, x: Tensor, y: Tensor, product_sink, tensor_sink) -> Tensor:
    """The batch-mean cross-entropy of (x, y) and its gradients, derived by hand; returns the
    loss.

    Each weight gradient is handed over as a product, ``product_sink(weight, dz', h)``
    (gradient ``dz' h``), each bias gradient as a tensor, ``tensor_sink(bias, grad)``; no
    gradient is taken with respect to the input image. x: (B, D) images, y: (B,) labels.
    """
    mods = [*net.layers, net.out]
    # forward, keeping each module's normalized input h (B, in) and its scale r (B, 1)
    hs, rs = [], []
    u = net.input(x)
    for m in mods:
        rs.append(rms_scale(u))
        hs.append(u * rs[-1])
        u = torch.addmm(m.bias, hs[-1], m.weight.t())
        if m is not net.out:
            u.relu_()
    logp = torch.log_softmax(u, dim=1)  # (B, C)
    loss = -logp.gather(1, y[:, None]).mean()
    dz = logp.exp_()  # softmax, then minus the one-hot target, over the batch size
    dz[torch.arange(y.shape[0], device=y.device), y] -= 1.0
    dz.div_(y.shape[0])
    for i in reversed(range(len(mods))):
        m, h = mods[i], hs[i]
        if i > 0:  # gradient with respect to this module's input (weights move only at the end)
            dh = dz @ m.weight  # (B, in)
        product_sink(m.weight, dz.t(), h)
        tensor_sink(m.bias, dz.sum(0))
        if i > 0:
            # h = relu(z) * r, so h > 0 exactly where the ReLU below passed its input
            dz = rms_normalize_backward(dh, h, rs[i]).masked_fill_(h <= 0, 0.0)
    return loss


@torch.no_grad()
def sgd_step_(net: BPNet, optimizer: MomentumSGD, x: Tensor, y: Tensor) -> Tensor:
    """One step of ``optimizer`` on the batch-mean cross-entropy of (x, y); returns the loss.

    The same step as ``cross_entropy(net(x), y).backward(); optimizer.step()``, with the
    gradients of :func:`hand_backward_`: each weight gradient ``dz' h`` is folded into its
    velocity by one GEMM (:meth:`MomentumSGD.fold_product_`, ``v = momentum * v + dz' h`` in
    torch's convention) instead of being written to ``.grad``.
    """
    loss = hand_backward_(net, x, y, optimizer.fold_product_, optimizer.fold_)
    optimizer.step()  # weight decay into the velocities, then p -= lr v: one pass each
    return loss


def _write_product(p: Tensor, a: Tensor, b: Tensor) -> None:
    torch.mm(a, b, out=p.grad)


def _write_tensor(p: Tensor, g: Tensor) -> None:
    p.grad.copy_(g)


@torch.no_grad()
def error_rate(net: BPNet, split: Split, batch_size: int) -> float:
    wrong = 0
    for i in range(0, len(split), batch_size):
        wrong += int(
            (net(split.x[i : i + batch_size]).argmax(1) != split.y[i : i + batch_size]).sum()
        )
    return 100.0 * wrong / max(len(split), 1)


def make_optimizer(net: nn.Module, t: BPTrainConfig) -> torch.optim.Optimizer:
    """Adam, or :class:`MomentumSGD` in ``torch.optim.SGD``'s convention (classic momentum,
    weight decay on every parameter, inside the velocity)."""
    if t.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=t.lr, weight_decay=t.weight_cost)
    return MomentumSGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_cost)


class BPExperiment:
    def __init__(self, config: RunConfig, data: Datasets, device: torch.device, generator):
        self.config, self.data = config, data
        self.net = BPNet(config.model, generator).to(device)
        t = config.train
        self.optimizer = make_optimizer(self.net, t)
        # SGD steps use the hand-derived gradients of sgd_step_; False: autograd (and Adam)
        self.hand_derived = isinstance(self.optimizer, MomentumSGD)
        self.epochs = t.epochs
        self.samples_per_epoch = len(data.train)
        self.comm = None  # a fflab.distributed.Comm: step() then trains on this rank's rows
        self._buckets = None

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimizer step on the batch (x, y); returns its loss."""
        if self.comm is not None:
            return self._parallel_step(x, y)
        if self.hand_derived:
            return sgd_step_(self.net, self.optimizer, x, y)
        loss = F.cross_entropy(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _parallel_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One step on the global batch x (B, D), y (B,) of which this rank computes its rows'
        gradients; they are all-reduced (weighted by the rank's share of rows) before the
        update. Returns the global batch's loss."""
        from fflab.distributed import GradBuckets

        comm, b = self.comm, x.shape[0]
        if self._buckets is None:
            units = [list(m.parameters()) for m in (*self.net.layers, self.net.out)]
            self._buckets = GradBuckets(units, extra=1)
        rows = comm.rows(b)
        xs, ys = x[rows].contiguous(), y[rows]
        if self.hand_derived:
            self._buckets.bind()
            loss = hand_backward_(self.net, xs, ys, _write_product, _write_tensor)
        else:
            self._buckets.zero_()
            self._buckets.bind()
            with torch.enable_grad():
                loss = F.cross_entropy(self.net(xs), ys)
                loss.backward()
            self._buckets.adopt()
            loss = loss.detach()
        loss = self._buckets.reduce_(comm, comm.count(b) / b, extra=loss.reshape(1))[0]
        self.optimizer.step()
        return loss

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
            loss = self.step(x[idx], y[idx])  # detached
            total += loss
            batches += 1
            on_batch(min(start + t.batch_size, n), lambda loss=loss: {"loss": float(loss)})
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
