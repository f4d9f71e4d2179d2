"""Forward-Forward math as pure functions of tensors.

Shapes: ``B`` batch, ``D`` input features, ``H`` hidden units, ``C`` classes.

The goodness of a layer is a function of its ReLU activities. Every goodness is turned into a
logit for "this is positive data" as ``sign * (f(a) - theta)``: for ``"sumsq"`` (the paper's
choice) and ``"meansq"`` the sign is +1, for ``"minssq"`` (the paper's CIFAR-10 variant, where
positive data should have a *small* sum of squares) it is -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GOODNESS_KINDS = ("sumsq", "meansq", "minssq")

RMS_EPS = 1e-8


def goodness(a: Tensor, kind: str = "sumsq") -> Tensor:
    """Goodness of activities ``a`` of shape (..., H) -> (...).

    ``sumsq`` and ``minssq`` both measure the sum of squares (they differ in the sign of the
    logit, see :func:`positive_logit`); ``meansq`` is the mean of squares.
    """
    if kind in ("sumsq", "minssq"):
        return a.square().sum(-1)
    if kind == "meansq":
        return a.square().mean(-1)
    raise ValueError(f"unknown goodness {kind!r}; choose one of {', '.join(GOODNESS_KINDS)}")


def goodness_sign(kind: str) -> float:
    """+1 if positive data should have a large goodness, -1 if a small one."""
    if kind not in GOODNESS_KINDS:
        raise ValueError(f"unknown goodness {kind!r}; choose one of {', '.join(GOODNESS_KINDS)}")
    return -1.0 if kind == "minssq" else 1.0


def positive_logit(g: Tensor, theta: float, kind: str = "sumsq") -> Tensor:
    """Logit of P(positive) from goodness ``g`` (...) -> (...)."""
    return goodness_sign(kind) * (g - theta)


def ff_loss(g_pos: Tensor, g_neg: Tensor, theta: float, kind: str = "sumsq") -> Tensor:
    """Mean logistic FF loss of one layer: (B,), (B,) -> scalar.

    ``softplus(-logit_pos) + softplus(logit_neg)``, i.e. for ``sumsq``
    ``softplus(theta - G_pos) + softplus(G_neg - theta)``, averaged over the batch. Computed
    as logistic cross-entropy, which is exact for every logit: ``F.softplus`` switches to the
    identity above 20, so its gradient there is 1 instead of ``sigmoid(20) = 1 - 2e-9``.
    """
    lp, ln = positive_logit(g_pos, theta, kind), positive_logit(g_neg, theta, kind)
    return F.binary_cross_entropy_with_logits(
        lp, torch.ones_like(lp)
    ) + F.binary_cross_entropy_with_logits(ln, torch.zeros_like(ln))


def goodness_loss_terms(
    ssq: Tensor, theta: Tensor, widths: Tensor, target: Tensor, kind: str = "sumsq"
) -> tuple[Tensor, Tensor]:
    """Every layer's FF loss statistics and loss gradient coefficients at once.

    ``ssq`` (L, 2B): each layer's sums of squares of activities, rows [:B] positive and [B:]
    negative; ``theta`` and ``widths`` (L, 1); ``target`` (L, 2B): 1 for positive rows, 0 for
    negative ones. Returns ``stats`` (L, 3): batch-mean loss, mean positive goodness, mean
    negative goodness; and ``coef`` (L, 2B) with ``dL/dz = coef * a`` for the batch-mean loss
    (``a = relu(z)`` is 0 where the ReLU gate is shut, so no mask is needed).
    """
    n_layers, b = ssq.shape[0], ssq.shape[1] // 2
    g = ssq / widths if kind == "meansq" else ssq
    sign = goodness_sign(kind)
    logit = sign * (g - theta)
    # logistic loss of "positive": target 1 on positive rows, 0 on negative rows
    loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    means = torch.stack([loss, g]).view(2, n_layers, 2, b).mean(3)  # (2, L, 2)
    stats = torch.cat([means[0].sum(1, keepdim=True), means[1]], 1)  # (L, 3)
    # dL/dz = (sigmoid(logit) - target) * sign * dg/da / B with dg/da = scale * a
    scale = 2.0 / widths if kind == "meansq" else 2.0
    coef = torch.sigmoid(logit).sub_(target).mul_(scale * (sign / b))  # (L, 2B)
    return stats, coef


def rms_scale(x: Tensor, eps: float = RMS_EPS) -> Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` of each row of ``x``: (..., D) -> (..., 1)."""
    return torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def rms_normalize(x: Tensor, eps: float = RMS_EPS) -> Tensor:
    """Divide each row of ``x`` (..., D) by its root mean square, so only its direction is kept."""
    return x * rms_scale(x, eps)


def rms_normalize_backward(dy: Tensor, y: Tensor, r: Tensor) -> Tensor:
    """Gradient through :func:`rms_normalize`: (..., D) -> (..., D).

    ``y = x * r`` with ``r = (mean(x^2) + eps)^(-1/2)`` of shape (..., 1); then
    ``dL/dx = r * (dL/dy - y * mean(dL/dy * y))``.
    """
    s = (dy * y).mean(-1, keepdim=True)
    return torch.addcmul(dy, y, s, value=-1.0).mul_(r)


def dloss_dz(
    a: Tensor, g: Tensor, theta: float, kind: str, positive: bool, batch_size: int
) -> Tensor:
    """Gradient of the batch-mean FF loss with respect to a layer's total input: (B, H).

    ``a = relu(z)`` (B, H) and ``g = goodness(a, kind)`` (B,). For a positive sample the loss
    is ``softplus(-l)``, for a negative one ``softplus(l)``, with ``l = sign * (g - theta)``;
    so ``dL/dz = dL/dl * sign * dg/da * 1[z > 0] / batch_size``.
    """
    sign = goodness_sign(kind)
    logit = sign * (g - theta)  # (B,)
    # d softplus(-l)/dl = -sigmoid(-l); d softplus(l)/dl = sigmoid(l)
    dl = -torch.sigmoid(-logit) if positive else torch.sigmoid(logit)  # (B,)
    scale = 2.0 / a.shape[-1] if kind == "meansq" else 2.0
    coef = (dl * (sign * scale / batch_size)).unsqueeze(-1)  # (B, 1)
    return coef * a  # a is already 0 where z <= 0, so a = a * 1[z > 0]


def peer_norm_dz(running_mean: Tensor, strength: float, batch_size: int) -> Tensor:
    """Peer-normalization term added to dL/dz of every positive sample: (H,) -> (H,).

    Pushes each unit's running mean activity towards the layer's average, so units neither die
    nor stay always on. As a derivative of a loss to be *minimized*, an under-active unit
    (running mean below the layer mean) gets a negative term, so descent raises its input.
    Not gated by the ReLU: a dead unit still receives it. Scaled by ``1 / batch_size`` to match
    the batch-mean loss gradients it is added to.
    """
    return (strength / batch_size) * (running_mean - running_mean.mean())


def label_rows(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """One-hot label rows (B,) -> (B, C); label -1 means the neutral label (all entries 0.1)."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    known = labels >= 0
    out[known] = F.one_hot(labels[known], num_classes).to(dtype)
    out[~known] = 0.1
    return out


def dropout_mask(
    shape: tuple[int, ...], p: float, generator: torch.Generator, like: Tensor
) -> Tensor:
    """Inverted-dropout mask: 0 with probability p, else 1 / (1 - p); dtype and device of ``like``.

    Drawn on the generator's device, so a CPU generator gives the same masks for any ``like``.
    """
    u = torch.rand(shape, generator=generator, device=generator.device)
    return (u >= p).to(like.device, like.dtype).mul_(1.0 / (1.0 - p))


def embed_label(x: Tensor, labels: Tensor, num_classes: int, mode: str = "overlay") -> Tensor:
    """Write labels into inputs: x (B, D), labels (B,) -> (B, D) or (B, C + D).

    ``overlay`` replaces the first C features of each image (MNIST's black top border) with the
    label row; ``concat`` prepends it, ``h0 = [y; x]``. Label -1 is the neutral label. Each
    row depends only on its own image and label, never on the rest of the batch.
    """
    y = label_rows(labels, num_classes, x.dtype)
    if mode == "overlay":
        return torch.cat([y, x[:, num_classes:]], dim=1)
    if mode == "concat":
        return torch.cat([y, x], dim=1)
    raise ValueError(f"unknown label mode {mode!r}; choose overlay or concat")
