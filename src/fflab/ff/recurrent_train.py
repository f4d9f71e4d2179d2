"""Training recurrent FF networks: the fast step on the shared FF core, and its run glue.

A step on images x (B, D) with labels y (B,):

1. *Bottom-up phase*: one pass from the image gives the start states ``s^0`` (label-free).
   The softmax head learns on their normalized values; the negative source (``hard``: a
   wrong label drawn in proportion to the head's probabilities, or ``random``) sees its
   probabilities before it learns.
2. *Positive and negative phases*, stacked (rows [:B] the correct label at the top, [B:] the
   wrong one), run ``iterations`` synchronous updates from ``s^0``. At each iteration of the
   training window, each layer's goodness loss gives ``dL/ds = coef * s`` by
   :func:`~fflab.ff.functional.goodness_loss_terms`; the state ``s = damping * s_old + (1 -
   damping) * relu(z)`` with ``s_old`` held fixed gives ``dL/dz = (1 - damping) * 1[z > 0] *
   dL/ds``. The loss is the mean over the window's iterations of the layers' summed losses.
3. *Local gradients*: a layer's weights see, at every iteration, the normalized states at the
   previous one, so each weight's gradient is one product of the iterations' ``dz`` stacked
   over its inputs stacked (through the layer's
   :meth:`~fflab.ff.layers.FFLayer.local_grad`); the image and the label are the same at
   every iteration (and the image the same for the positive and negative row), so their
   weights take the sum of ``dz`` over iterations (and phases).

The plain autograd statement is :class:`fflab.ff.reference.RecurrentReferenceTrainer`; the
tests hold the two equal in float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fflab.config import RunConfig
from fflab.data import Datasets, Split
from fflab.ff.experiment import FFExperiment, error_rate
from fflab.ff.functional import goodness_loss_terms, peer_norm_dz
from fflab.ff.recurrent import RecurrentFFNet
from fflab.ff.train import FFTrainConfig, FFTrainer, _normalized, _sumsq
from fflab.negatives import NEGATIVE_SOURCES


def check_train_config(cfg: FFTrainConfig) -> None:
    """The FF training settings a recurrent net supports (one-line errors otherwise)."""
    if cfg.layer_schedule != "simultaneous":
        raise ValueError("a recurrent net trains every layer together: layer_schedule=simultaneous")
    if cfg.input_dropout > 0 or cfg.dropout > 0:
        raise ValueError("a recurrent net does not support dropout (input_dropout, dropout)")
    if not NEGATIVE_SOURCES[cfg.negatives].labelled:
        raise ValueError(
            f"a recurrent net needs wrong-label negatives (hard, random), got {cfg.negatives}"
        )


class RecurrentTrainer(FFTrainer):
    """The fast recurrent FF step: the FF trainer's optimizer, sink and negative source."""

    def __init__(self, net: RecurrentFFNet, cfg: FFTrainConfig) -> None:
        check_train_config(cfg)
        super().__init__(net, cfg)
        self._down = list(net.down)

    @torch.no_grad()
    def compute_gradients(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        """All three phases and every layer's local gradients; returns the stats (L, 3).

        Stats: FF loss, mean positive goodness, mean negative goodness, each averaged over
        the training window's iterations.
        """
        net, c, b = self.net, self.net.config, x.shape[0]
        n_layers, d = net.num_layers, c.damping
        if active is not None and list(active) != list(range(n_layers)):
            raise ValueError("a recurrent net trains every layer together")
        up, down = self._layers, self._down
        widths, theta, target, eye = self._constants(b, x)

        # bottom-up phase: start states, head, negative labels
        hx = _normalized(x, _sumsq(x))  # (B, D)
        u0 = up[0](hx)  # (B, H_0): layer 0's bottom-up input at every iteration
        start = [torch.relu(u0)]
        for layer in up[1:]:
            start.append(torch.relu(layer(_normalized(start[-1], _sumsq(start[-1])))))
        normed0 = [_normalized(s, _sumsq(s)) for s in start]
        y_neg = self._head_phase(x, y, torch.cat(normed0[c.head_from :], 1), eye, generator)

        # positive and negative phases, stacked
        top = net.label_input(torch.cat([y, y_neg]), x.dtype)  # (2B, C)
        top_in = down[-1](top)  # (2B, H_top): the label's input at every iteration
        u0 = u0.repeat(2, 1)
        states = [s.repeat(2, 1) for s in start]
        normed = [s.repeat(2, 1) for s in normed0]
        window = range(c.train_from, c.iterations + 1)
        scale = (1 - d) / len(window)
        dz: list[list[Tensor]] = [[] for _ in range(n_layers)]  # per layer, per iteration
        seen: list[list[Tensor]] = []  # normalized states each window iteration reads
        pos_mean = [x.new_zeros(h) for h in c.hidden]
        stats = x.new_zeros(n_layers, 3)
        for t in range(1, c.iterations + 1):
            new, gates = [], []
            for i in range(n_layers):
                z = u0 if i == 0 else up[i](normed[i - 1])
                z = z + (top_in if i == n_layers - 1 else down[i](normed[i + 1]))
                a = torch.relu_(z)
                gates.append(a > 0)
                new.append(torch.add(a.mul_(1 - d), states[i], alpha=d))
            if t in window:
                ssq = torch.stack([_sumsq(s) for s in new])  # (L, 2B)
                st, coef = goodness_loss_terms(ssq, theta, widths, target, c.goodness)
                stats += st
                for i, s in enumerate(new):
                    dz[i].append(s * (coef[i] * scale).unsqueeze(1) * gates[i])
                    pos_mean[i] += s[:b].mean(0)
                seen.append(normed)
            states = new
            normed = [_normalized(s, _sumsq(s)) for s in states]

        n_w = len(window)
        self._count_active([s[:b] for s in states])  # the positive rows' final states
        for i in range(n_layers):
            if c.peer_norm > 0:
                rm = net.running_mean(i)
                rm.lerp_(pos_mean[i] / n_w, 1 - c.peer_momentum)
                term = peer_norm_dz(rm, c.peer_norm, b) / n_w
                for g in dz[i]:
                    g[:b] += term
            dz_all = torch.cat(dz[i])  # (n_w * 2B, H_i), iteration-major
            if i == 0:
                total = torch.stack(dz[0]).sum(0)  # (2B, H_0)
                up[0].local_grad(hx, total[:b] + total[b:], self._param_grad)
            else:
                up[i].local_grad(torch.cat([s[i - 1] for s in seen]), dz_all, self._param_grad)
            if i == n_layers - 1:
                down[i].local_grad(top, torch.stack(dz[i]).sum(0), self._param_grad)
            else:
                down[i].local_grad(torch.cat([s[i + 1] for s in seen]), dz_all, self._param_grad)
        self._inactive = []
        return stats / n_w


# -- the run glue ------------------------------------------------------------------------------
@torch.no_grad()
def label_goodness(net: RecurrentFFNet, split: Split, iterations: int, batch_size: int) -> Tensor:
    """:meth:`RecurrentFFNet.label_goodness` over a split in batches: (N, C, T, L)."""
    parts = [
        net.label_goodness(split.x[i : i + batch_size], iterations)
        for i in range(0, len(split), batch_size)
    ]
    return torch.cat(parts) if parts else split.x.new_empty(0, net.config.num_classes, 0, 0)


def _error(scores: Tensor, y: Tensor) -> float:
    return 100.0 * float((scores.argmax(1) != y).sum()) / max(len(y), 1)


def iteration_report(net: RecurrentFFNet, g: Tensor, y: Tensor) -> dict[str, Any]:
    """Test errors and goodness by iteration from label goodness g (N, C, T, L), labels (N,).

    ``error_by_iteration[t-1]``: error scoring by iteration t alone; ``error_up_to_iteration``:
    by iterations 1..t summed; ``goodness_pos``/``goodness_neg`` [t-1][i]: mean goodness of
    layer i at iteration t with the true label, and with the wrong labels (mean over them).
    """
    t_max = g.shape[2]
    out: dict[str, Any] = {
        "error_by_iteration": [_error(net.scores(g, (t, t)), y) for t in range(1, t_max + 1)],
        "error_up_to_iteration": [_error(net.scores(g, (1, t)), y) for t in range(1, t_max + 1)],
    }
    true = torch.nn.functional.one_hot(y, g.shape[1]).bool()  # (N, C)
    pos = g[true].mean(0)  # (T, L)
    neg = g[~true].mean(0)
    out["goodness_pos"], out["goodness_neg"] = pos.tolist(), neg.tolist()
    return out


class RecurrentExperiment(FFExperiment):
    """A recurrent FF run: :class:`FFExperiment`'s loop with the recurrent net and step."""

    net_cls, trainer_cls = RecurrentFFNet, RecurrentTrainer

    def epoch_evaluation(self) -> dict[str, float]:
        out: dict[str, float] = {}
        bs = self.config.data.eval_batch_size
        splits = {"val": self.data.validation}
        if self.config.train.log_test_error:
            splits["test"] = self.data.test
        for name, split in splits.items():
            if split is not None:
                out[f"{name}_error_goodness"] = self._error(split, "goodness", bs)
                out[f"{name}_error_softmax"] = self._error(split, "softmax", bs)
        return out

    def _error(self, split: Split, mode: str, bs: int) -> float:
        return error_rate(self.net, split, mode, bs)

    def evaluate(self) -> dict[str, Any]:
        """Test error by the scoring window and the head; errors and goodness by iteration."""
        net, bs = self.net, self.config.data.eval_batch_size
        net.eval()
        t_max = max(net.config.iterations, net.config.score_window[1])
        test = self.data.test
        g = label_goodness(net, test, t_max, bs)
        out: dict[str, Any] = {
            "test_error_goodness": _error(net.scores(g), test.y),
            "test_error_softmax": self._error(test, "softmax", bs),
            "score_window": list(net.config.score_window),
            **iteration_report(net, g, test.y),
        }
        if self.data.validation is not None:
            out["val_error_goodness"] = self._error(self.data.validation, "goodness", bs)
            out["val_error_softmax"] = self._error(self.data.validation, "softmax", bs)
        return out


def build(config: RunConfig, data: Datasets, device: torch.device, generator) -> FFExperiment:
    check_train_config(config.train)
    return RecurrentExperiment(config, data, device, generator)
