"""Training Forward-Forward networks: Hinton's recipe as a fast, hand-derived update.

Each minibatch runs the neutral-label pass together with the positive pass (one stacked
matrix product per layer), trains the softmax head on the neutral activities, draws negative
labels (hard: from the head's probabilities over wrong classes; or uniformly random), runs the
negative pass, and updates every active layer with its own local gradient: two matrix
products per layer and pass (forward and weight gradient), never a gradient with respect to a
layer's input. The first layer's image product is shared by all three passes, and positive and
negative samples share one weight-gradient product there (they have the same input scale).

The gradients equal autograd's on :meth:`FFNet.layer_losses` (checked in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fflab.ff.functional import dloss_dz, goodness, peer_norm_dz, positive_logit, rms_normalize
from fflab.ff.model import FFNet
from fflab.negatives import NEGATIVE_SOURCES, hard_wrong_labels, random_wrong_labels
from fflab.optim import SmoothedSGD, lr_factor


@dataclass(frozen=True)
class FFTrainConfig:
    """Optimization of an FF network (defaults: Hinton's released code)."""

    epochs: int = 100  # epochs (per layer when layer_schedule is greedy)
    batch_size: int = 100
    optimizer: str = "sgd"  # sgd (smoothed gradient + weight cost, Hinton's) | adam
    # Hinton's code steps along (1 - p) * a, half the true gradient 2 * (1 - p) * a of the
    # logistic loss that fflab differentiates; lr 0.005 here is his 0.01.
    lr: float = 0.005
    momentum: float = 0.9  # gradient smoothing: inc = momentum * inc + (1 - momentum) * grad
    weight_cost: float = 0.001  # L2 weight decay on FF weights (not biases)
    head_lr: float = 0.1
    head_weight_cost: float = 0.003
    lr_schedule: str = "hinton"  # hinton: constant for half the epochs, then linear to 0 | constant
    negatives: str = "hard"  # hard (sampled from the softmax head) | random (uniform wrong label)
    layer_schedule: str = "simultaneous"  # simultaneous (every layer, every batch) | greedy
    log_test_error: bool = False  # log test error per epoch (time-to-accuracy curves only)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.lr_schedule not in ("hinton", "constant"):
            raise ValueError(f"lr_schedule must be hinton or constant, got {self.lr_schedule!r}")
        if self.negatives not in NEGATIVE_SOURCES:
            raise ValueError(f"negatives must be one of {NEGATIVE_SOURCES}, got {self.negatives!r}")
        if self.layer_schedule not in ("simultaneous", "greedy"):
            raise ValueError("layer_schedule must be simultaneous or greedy")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("learning rates must be > 0")


def make_optimizer(net: FFNet, cfg: FFTrainConfig) -> torch.optim.Optimizer:
    """One optimizer, four groups: FF weights, FF biases, head weight, head bias."""
    groups = [
        {"params": [m.weight for m in net.layers], "lr": cfg.lr, "weight_decay": cfg.weight_cost},
        {"params": [m.bias for m in net.layers], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [net.head.weight], "lr": cfg.head_lr, "weight_decay": cfg.head_weight_cost},
        {"params": [net.head.bias], "lr": cfg.head_lr, "weight_decay": 0.0},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups)
    return SmoothedSGD(groups, lr=cfg.lr, momentum=cfg.momentum)


class FFTrainer:
    """Owns the optimizer of an :class:`FFNet` and applies Hinton's update to minibatches."""

    def __init__(self, net: FFNet, cfg: FFTrainConfig) -> None:
        self.net = net
        self.cfg = cfg
        self.optimizer = make_optimizer(net, cfg)

    def set_lr_factor(self, factor: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    def _pass(self, z0: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Activities and normalized layer inputs from first-layer input z0 (N, H_0)."""
        a = torch.relu(z0)
        acts, inputs = [a], [z0]  # inputs[0] is unused: layer 0's input is the image
        for layer in self.net.layers[1:]:
            h = rms_normalize(a)
            a = torch.relu(torch.addmm(layer.bias, h, layer.weight.T))
            acts.append(a)
            inputs.append(h)
        return acts, inputs

    @torch.no_grad()
    def step(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        """One update on images x (B, D) with labels y (B,); returns per-layer stats (L, 3).

        Columns of the stats: FF loss, mean positive goodness, mean negative goodness.
        ``active`` lists the layers that learn (default: all); the head always learns.
        """
        net, cfg, c = self.net, self.cfg, self.net.config
        n_layers, b, k = net.num_layers, x.shape[0], c.num_classes
        active = range(n_layers) if active is None else active

        a_img, sq = net.image_part(x)  # (B, H_0), (B,)
        s_lab = net.label_scale(sq, neutral=False)  # (B,) one-hot label: same for pos and neg
        s_neu = net.label_scale(sq, neutral=True)  # (B,)
        z0 = torch.cat([net.first_layer(a_img, s_lab, y), net.first_layer(a_img, s_neu, None)])
        acts_pn, inputs_pn = self._pass(z0)  # positive rows [:B], neutral rows [B:]

        # softmax head on the neutral pass (its gradient stays in the head)
        feats = net.head_features([a[b:] for a in acts_pn])  # (B, F)
        logits = net.head(feats)  # (B, C)
        probs = torch.softmax(logits, 1)
        dlogits = (probs - F.one_hot(y, k).to(probs.dtype)) / b  # (B, C)
        net.head.weight.grad = dlogits.T @ feats
        net.head.bias.grad = dlogits.sum(0)

        if cfg.negatives == "hard":
            y_neg = hard_wrong_labels(y, probs, generator).to(y.device)
        else:
            y_neg = random_wrong_labels(y, k, generator)
        acts_neg, inputs_neg = self._pass(net.first_layer(a_img, s_lab, y_neg))

        stats = torch.zeros(n_layers, 3, dtype=x.dtype, device=x.device)
        for i in range(n_layers):
            a_pos, a_neg = acts_pn[i][:b], acts_neg[i]
            theta = net.theta(i)
            g_pos, g_neg = goodness(a_pos, c.goodness), goodness(a_neg, c.goodness)
            stats[i, 0] = (
                F.softplus(-positive_logit(g_pos, theta, c.goodness)).mean()
                + F.softplus(positive_logit(g_neg, theta, c.goodness)).mean()
            )
            stats[i, 1], stats[i, 2] = g_pos.mean(), g_neg.mean()
            if i not in active:
                continue
            dz_pos = dloss_dz(a_pos, g_pos, theta, c.goodness, True, b)  # (B, H_i)
            dz_neg = dloss_dz(a_neg, g_neg, theta, c.goodness, False, b)
            if c.peer_norm > 0:
                rm = net.running_mean(i)
                rm.mul_(c.peer_momentum).add_(a_pos.mean(0), alpha=1 - c.peer_momentum)
                dz_pos += peer_norm_dz(rm, c.peer_norm, b)
            layer = net.layers[i]
            if i == 0:
                self._first_layer_grad(x, y, y_neg, dz_pos, dz_neg, s_lab)
            else:
                # one product over the stacked positive and negative samples
                dz = torch.cat([dz_pos, dz_neg])  # (2B, H_i)
                layer.weight.grad = dz.T @ torch.cat([inputs_pn[i][:b], inputs_neg[i]])
            layer.bias.grad = dz_pos.sum(0) + dz_neg.sum(0)
        for i in range(n_layers):
            if i not in active:
                net.layers[i].weight.grad = net.layers[i].bias.grad = None
        self.optimizer.step()
        return stats

    def _first_layer_grad(
        self, x: Tensor, y: Tensor, y_neg: Tensor, dz_pos: Tensor, dz_neg: Tensor, scale: Tensor
    ) -> None:
        """Weight gradient of layer 0, whose input is ``scale * [label; image]``.

        Positive and negative samples share the image and the scale, so the image columns
        need one product of the summed gradients; the label columns are a scatter-add.
        """
        net, k = self.net, self.net.config.num_classes
        layer = net.layers[0]
        xr = x[:, k:] if net.config.label_mode == "overlay" else x  # (B, Dx)
        dz_pos = dz_pos * scale.unsqueeze(1)
        dz_neg = dz_neg * scale.unsqueeze(1)
        grad = torch.empty_like(layer.weight)  # (H_0, C + Dx)
        torch.mm((dz_pos + dz_neg).T, xr, out=grad[:, k:])
        gy = torch.zeros(k, grad.shape[0], dtype=grad.dtype, device=grad.device)
        gy.index_add_(0, y, dz_pos).index_add_(0, y_neg, dz_neg)  # (C, H_0)
        grad[:, :k] = gy.T
        layer.weight.grad = grad

    def train_epoch(
        self,
        x: Tensor,
        y: Tensor,
        epoch: int,
        generator: torch.Generator,
        active: range | None = None,
        lr_epochs: int | None = None,
        on_batch=None,
    ) -> Tensor:
        """One pass over (x, y) in a random order; returns the epoch's mean stats (L, 3).

        ``lr_epochs`` is the length of the learning-rate schedule that ``epoch`` is in
        (default: the configured epochs). ``on_batch(n_seen, stats)`` is called after every
        minibatch, for progress bars.
        """
        cfg = self.cfg
        self.set_lr_factor(lr_factor(epoch, lr_epochs or cfg.epochs, cfg.lr_schedule))
        n = x.shape[0]
        order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
        total = torch.zeros(self.net.num_layers, 3, dtype=x.dtype, device=x.device)
        batches = 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            stats = self.step(x[idx], y[idx], generator, active)
            total += stats
            batches += 1
            if on_batch is not None:
                on_batch(min(start + cfg.batch_size, n), stats)
        return total / batches
