"""Linear probes: how much a frozen FF network's features say about the labels.

The paper's unsupervised FF result reads the RMS-normalized activities of the last three hidden
layers with a linear softmax classifier. Here the features are computed once under
``no_grad`` (so nothing can reach the network's weights) and a fresh linear layer is trained
on them with Adam and L2 weight decay.

Shapes: ``N`` images, ``F`` features, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fflab.ff.functional import rms_normalize
from fflab.ff.model import FFNet


@dataclass(frozen=True)
class ProbeConfig:
    """Adam on the cross-entropy, minibatches of ``batch_size``, a fixed learning rate.

    The defaults were chosen on a validation split (the last 10,000 MNIST training images,
    probes fitted on the other 50,000) of an ``mnist-ff-unsup-quick`` net: lr 1e-3 with L2
    1e-4 for 20 epochs stopped at 0.37% training error and 2.08% validation error; lr 1e-4
    without L2 for 40 epochs gave 1.66% (lr 5e-5 or 3e-4, 60 or 100 epochs, a cosine
    schedule: 1.61-1.81%).
    """

    epochs: int = 40
    lr: float = 1e-4
    weight_decay: float = 0.0  # L2 penalty added to the gradient (Adam's weight_decay)
    batch_size: int = 100


@torch.no_grad()
def layer_features(net: FFNet, x: Tensor, batch_size: int = 1000) -> list[Tensor]:
    """Normalized activities of every hidden layer (neutral label if supervised): [(N, H_l)]."""
    chunks: list[list[Tensor]] = [[] for _ in range(net.num_layers)]
    for i in range(0, x.shape[0], batch_size):
        for store, a in zip(chunks, net.neutral_activities(x[i : i + batch_size]), strict=True):
            store.append(rms_normalize(a))
    return [torch.cat(c) for c in chunks]


def fit_probe(
    feats: Tensor, y: Tensor, num_classes: int, cfg: ProbeConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Softmax regression on features (N, F) and labels (N,); returns W (C, F), b (C,).

    Minibatches in a fresh random order every epoch, drawn from ``generator``; the features
    are read, never written.
    """
    ((w, b),) = fit_probes(feats, [range(feats.shape[1])], y, num_classes, cfg, generator)
    return w, b


def fit_probes(
    feats: Tensor,
    columns: Sequence[Sequence[int] | range],
    y: Tensor,
    num_classes: int,
    cfg: ProbeConfig,
    generator: torch.Generator,
) -> list[tuple[Tensor, Tensor]]:
    """Independent softmax regressions, one per set of feature columns, in one loop.

    ``feats`` (N, F), ``columns[k]`` the columns probe k reads, ``y`` (N,). Returns ``[(W_k
    (C, F_k), b_k (C,))]``. Each probe's loss depends on its own parameters only and Adam
    updates every parameter from its own gradient, so this equals fitting each probe alone
    with the same minibatch order (``generator``; the tests hold the two equal); it only
    shares the minibatch gathers and the optimizer's loop.
    """
    cols = [torch.as_tensor(list(c), dtype=torch.long, device=feats.device) for c in columns]
    contiguous = [
        (int(c[0]), int(c[-1]) + 1) if len(c) and bool((c.diff() == 1).all()) else None
        for c in cols
    ]
    params = []
    for c in cols:
        w = torch.zeros(num_classes, len(c), dtype=feats.dtype, device=feats.device)
        b = torch.zeros(num_classes, dtype=feats.dtype, device=feats.device)
        params.append((w.requires_grad_(True), b.requires_grad_(True)))
    opt = torch.optim.Adam(
        [t for pair in params for t in pair], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    n = feats.shape[0]
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator, device=generator.device)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size].to(feats.device)
                fb, yb = feats[idx], y[idx]  # (b, F), (b,)
                loss = fb.new_zeros(())
                for (w, b), c, span in zip(params, cols, contiguous, strict=True):
                    part = fb[:, span[0] : span[1]] if span else fb.index_select(1, c)
                    loss = loss + F.cross_entropy(F.linear(part, w, b), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return [(w.detach(), b.detach()) for w, b in params]


@torch.no_grad()
def probe_error(w: Tensor, b: Tensor, feats: Tensor, y: Tensor) -> float:
    """Error in percent of the probe (W, b) on features (N, F) with labels (N,)."""
    wrong = int((F.linear(feats, w, b).argmax(1) != y).sum())
    return 100.0 * wrong / max(y.shape[0], 1)


def select(feats: Sequence[Tensor], layers: Sequence[int]) -> Tensor:
    """The concatenated features of ``layers``: (N, sum of their widths)."""
    return torch.cat([feats[i] for i in layers], 1)
