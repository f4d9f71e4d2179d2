"""The FF step stated plainly, on autograd: what :class:`fflab.ff.train.FFTrainer` computes fast.

Every mode, layer type, goodness function and negative source goes through the same few
lines: build the positive and negative batch, then for each layer normalize its input
(*detached*, so no gradient reaches the layer below), compute its activities, goodness and
logistic FF loss, and finally call ``backward()`` once on the sum of the layers' losses (plus
the softmax head's cross-entropy for a supervised net). Each parameter then holds the gradient
of its own layer's loss only. Random draws happen in the fast step's order (input dropout,
negatives, each layer's dropout), so with the same generator both make the same step; the
tests hold their gradients equal in float64.

Peer normalization is not the gradient of a loss of the activities; it is written as the
linear loss ``sum_rows(z_pos . t)`` whose gradient with respect to ``z`` is the term ``t``.

A net's boxes between layers (``FFNet(between=...)``, :mod:`fflab.ff.boxes`) are applied to
each layer's activities, detached and under ``no_grad``, before the next layer normalizes
them: the box's output is a constant input to the layer above, so a box needs no gradient.
The fast trainer applies them the same way (the tests hold the two equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fflab.ff.functional import dropout_mask, ff_loss, goodness, peer_norm_dz, rms_normalize
from fflab.ff.model import FFNet
from fflab.ff.recurrent import RecurrentFFNet
from fflab.ff.train import FFTrainConfig, make_optimizer, negative_source


class ReferenceTrainer:
    """Autograd FF step: ``compute_gradients`` fills ``.grad``, ``apply_gradients`` steps."""

    def __init__(self, net: FFNet, cfg: FFTrainConfig) -> None:
        self.net, self.cfg = net, cfg
        self.source = negative_source(net, cfg)
        self.optimizer = make_optimizer(net, cfg)
        self._inactive: list[int] = []

    def compute_gradients(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        """Gradients of the summed local losses in ``.grad``; returns the stats (L, 3)."""
        net, c, cfg, b = self.net, self.net.config, self.cfg, x.shape[0]
        active = range(net.num_layers) if active is None else active
        net.zero_grad(set_to_none=True)
        if cfg.input_dropout > 0:
            x = x * dropout_mask(x.shape, cfg.input_dropout, generator, x)
        loss = x.new_zeros(())
        if c.supervised:  # neutral phase: the head learns, the source sees its probabilities
            with torch.no_grad():
                feats = net.head_features(net.activities(x))  # labels None: neutral
            logits = net.head(feats)
            loss = loss + F.cross_entropy(logits, y)
            neg = self.source.draw(x, y, generator, torch.softmax(logits.detach(), 1))
            h = torch.cat([net.embed(x, y), net.embed(neg.x, neg.y)])
        else:
            neg = self.source.draw(x, y, generator)
            h = torch.cat([x, neg.x])
        stats = []
        for i, layer in enumerate(net.layers):
            inp = rms_normalize(h.detach())  # (2B, in): rows [:B] positive, [B:] negative
            if i > 0 and cfg.dropout > 0:
                inp = inp * dropout_mask(inp.shape, cfg.dropout, generator, inp)
            z = layer(inp)
            a = torch.relu(z)
            g = goodness(a, c.goodness)
            layer_loss = ff_loss(g[:b], g[b:], net.theta(i), c.goodness)
            stats.append(torch.stack([layer_loss, g[:b].mean(), g[b:].mean()]).detach())
            if i in active:
                if c.peer_norm > 0:
                    rm = net.running_mean(i)
                    rm.lerp_(a[:b].detach().mean(0), 1 - c.peer_momentum)
                    layer_loss = layer_loss + (z[:b] * peer_norm_dz(rm, c.peer_norm, b)).sum()
                loss = loss + layer_loss
            if i + 1 < net.num_layers:
                with torch.no_grad():  # the box's output is a constant for the layer above
                    h = net.box(i, a.detach())
        loss.backward()
        self._inactive = [i for i in range(net.num_layers) if i not in active]
        return torch.stack(stats)

    def apply_gradients(self) -> None:
        for i in self._inactive:
            self.net.layers[i].weight.grad = self.net.layers[i].bias.grad = None
        self.optimizer.step()

    def step(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        stats = self.compute_gradients(x, y, generator, active)
        self.apply_gradients()
        return stats


class RecurrentReferenceTrainer(ReferenceTrainer):
    """Autograd recurrent FF step (what :class:`fflab.ff.recurrent_train.RecurrentTrainer`
    computes fast): states detached across layers and iterations, one ``backward``.

    The loss: the head's cross-entropy on the bottom-up start, plus the mean over the training
    window's iterations of every layer's FF loss (peer normalization as a linear loss of the
    positive rows' total inputs, as above).
    """

    def __init__(self, net: RecurrentFFNet, cfg: FFTrainConfig) -> None:
        super().__init__(net, cfg)

    def compute_gradients(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        net, c, b = self.net, self.net.config, x.shape[0]
        net.zero_grad(set_to_none=True)
        with torch.no_grad():
            start = net.bottom_up(x)
        logits = net.head(torch.cat([rms_normalize(s) for s in start[c.head_from :]], 1))
        loss = F.cross_entropy(logits, y)
        neg = self.source.draw(x, y, generator, torch.softmax(logits.detach(), 1))
        xx, top = torch.cat([x, x]), net.label_input(torch.cat([y, neg.y]), x.dtype)
        states = [s.repeat(2, 1) for s in start]
        window = range(c.train_from, c.iterations + 1)
        n_w, d = len(window), c.damping
        stats = x.new_zeros(net.num_layers, 3)
        peer_terms = []  # (z of the positive rows, layer) of every window iteration
        for t in range(1, c.iterations + 1):
            old = [s.detach() for s in states]
            zs = net.total_inputs(xx, top, old)
            states = [d * s + (1 - d) * torch.relu(z) for s, z in zip(old, zs, strict=True)]
            if t not in window:
                continue
            for i, s in enumerate(states):
                g = goodness(s, c.goodness)
                layer_loss = ff_loss(g[:b], g[b:], net.theta(i), c.goodness)
                loss = loss + layer_loss / n_w
                stats[i] += torch.stack([layer_loss, g[:b].mean(), g[b:].mean()]).detach() / n_w
                peer_terms.append((i, zs[i][:b], s[:b].detach().mean(0)))
        if c.peer_norm > 0:
            for i in range(net.num_layers):
                mean = sum(m for j, _, m in peer_terms if j == i) / n_w
                net.running_mean(i).lerp_(mean, 1 - c.peer_momentum)
            for i, z, _ in peer_terms:
                term = peer_norm_dz(net.running_mean(i), c.peer_norm, b) / n_w
                loss = loss + (z * term).sum()
        loss.backward()
        self._inactive = []
        return stats
