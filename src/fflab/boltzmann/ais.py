"""Annealed importance sampling (AIS) of the partition function of a Bernoulli RBM.

Salakhutdinov & Murray, "On the quantitative analysis of deep belief networks" (ICML 2008).
The path runs from a base-rate model A (visible biases b_A, W = 0; its hiddens contribute
the constant 2**H) to the target RBM B through the unnormalized marginals

    log p*_beta(v) = (1 - beta) b_A.v + beta b_B.v + sum_j softplus(beta (b_h_j + (vW)_j))

so log Z_0 = H log 2 + sum_i softplus(b_A_i) and p*_1 is the RBM's own marginal. Each
chain starts at v ~ p_0 and, for k = 1..K, adds log p*_k(v) - log p*_{k-1}(v) to its
log-weight and then moves v by one block Gibbs step that leaves p_k invariant
(h_j ~ sigmoid(beta_k x_j), v_i ~ sigmoid((1 - beta_k) b_A_i + beta_k (b_B_i + (Wh)_i))).
Then Z_B / Z_0 is estimated by the mean of the weights w = exp(log-weight).

The estimate of Z is unbiased; its log is biased low (Jensen), by about se**2 / 2.
All chains run as one batch: two (C, V) x (V, H) matmuls per step, the per-step
log-weight increments are stored in the model's dtype and summed in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import bernoulli, check_batch, check_binary, check_generator, check_units
from .rbm import logit_of_mean

__all__ = [
    "AISResult",
    "ais_log_z",
    "ais_log_weights",
    "default_beta_schedule",
    "make_base_rate_visible_bias",
    "average_log_prob",
]

# Salakhutdinov & Murray's schedule: 0 -> 0.5 in 500 steps, 0.5 -> 0.9 in 4000,
# 0.9 -> 1 in 10000.
_SEGMENTS = ((0.5, 500), (0.9, 4000), (1.0, 10000))


class AISResult(NamedTuple):
    """log_z: the AIS estimate log Z_0 + log mean(w); std_error: its delta-method s.e."""

    log_z: float
    std_error: float


def default_beta_schedule(n_betas: int = 14500) -> Tensor:
    """Inverse temperatures 0 = beta_0 < ... < beta_K = 1 with K = ``n_betas`` steps.

    K = 14500 is Salakhutdinov & Murray's schedule exactly; other K scale its three
    linear segments (500 : 4000 : 10000). -> (K + 1,) float64.
    """
    check_units(n_betas, "n_betas")
    if n_betas < 3:
        raise ValueError(f"n_betas must be at least 3, got {n_betas}")
    total = sum(n for _, n in _SEGMENTS)
    n1 = max(1, round(n_betas * _SEGMENTS[0][1] / total))
    n2 = max(1, round(n_betas * _SEGMENTS[1][1] / total))
    counts = (n1, n2, n_betas - n1 - n2)
    parts, lo = [torch.zeros(1, dtype=torch.float64)], 0.0
    for (hi, _), n in zip(_SEGMENTS, counts, strict=True):
        parts.append(torch.linspace(lo, hi, n + 1, dtype=torch.float64)[1:])
        lo = hi
    return torch.cat(parts)


def make_base_rate_visible_bias(data: Tensor, eps: float = 1e-3) -> Tensor:
    """Visible biases of the base-rate model: logit of the training-data pixel means.

    data: (N, V) values in [0, 1]; means are clipped to [eps, 1 - eps]. -> (V,) float64.
    """
    return logit_of_mean(data, eps)


def _check_betas(betas: Tensor) -> list[float]:
    if not isinstance(betas, Tensor) or betas.dim() != 1 or betas.numel() < 2:
        raise ValueError("betas must be a 1-D tensor with at least 2 entries")
    b = betas.double()
    if b[0] != 0.0 or b[-1] != 1.0 or not bool((b[1:] > b[:-1]).all()):
        raise ValueError("betas must increase strictly from 0 to 1")
    return b.tolist()


@torch.no_grad()
def ais_log_weights(
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    base_visible_bias: Tensor,
    betas: Tensor,
    *,
    n_chains: int,
    generator: torch.Generator,
) -> Tensor:
    """Log importance weights log(p*_K(v_K) ... / ...) of ``n_chains`` AIS runs.

    W: (V, H), b_v: (V,), b_h: (H,), base_visible_bias: (V,), betas: (K + 1,) from 0
    to 1. Runs in W's dtype and device. -> (n_chains,) float64; the mean of their
    exponentials estimates Z / Z_0 with log Z_0 = H log 2 + sum softplus(base bias).
    """
    check_units(n_chains, "n_chains")
    check_generator(generator)
    beta = _check_betas(betas)
    W = W.detach()
    n_visible = W.shape[0]
    b_v, b_h = b_v.detach(), b_h.detach()
    b_a = base_visible_bias.detach().to(W)
    if b_a.shape != (n_visible,):
        raise ValueError(
            f"base_visible_bias must have shape ({n_visible},), got {tuple(b_a.shape)}"
        )
    WT = W.T.contiguous()  # (H, V): the down-pass reads rows
    db = b_v - b_a  # (V,)
    n_steps = len(beta) - 1
    increments = W.new_empty(n_steps, n_chains)  # (K, C) summed in float64 at the end

    v = bernoulli(torch.sigmoid(b_a).expand(n_chains, n_visible), generator)  # (C, V)
    x = torch.addmm(b_h, v, W)  # (C, H) hidden pre-activations of the current v
    for k in range(1, n_steps + 1):
        b_prev, b_k = beta[k - 1], beta[k]
        d = b_k - b_prev
        # log p*_k(v) - log p*_{k-1}(v). The softplus difference is written as
        # log1p(sigmoid(b_prev x) expm1(d x)), accurate in float32 for small d.
        soft = torch.log1p(torch.sigmoid(x * b_prev).mul_(torch.expm1(x * d))).sum(-1)
        torch.add(soft, v @ db, alpha=d, out=increments[k - 1])
        if k == n_steps:
            break
        h = bernoulli(torch.sigmoid(x * b_k), generator)  # (C, H)
        bias_k = torch.lerp(b_a, b_v, b_k)  # (1 - b_k) b_A + b_k b_B
        v = bernoulli(torch.sigmoid(torch.addmm(bias_k, h, WT, alpha=b_k)), generator)
        x = torch.addmm(b_h, v, W)
    return increments.double().sum(0)


def ais_log_z(
    rbm,
    n_chains: int = 100,
    n_betas: int = 14500,
    *,
    generator: torch.Generator,
    base_visible_bias: Tensor | None = None,
    betas: Tensor | None = None,
) -> AISResult:
    """AIS estimate of log Z of an RBM (anything with ``W`` (V, H), ``b_v``, ``b_h``).

    base_visible_bias: (V,) biases of the base-rate model, ideally
    :func:`make_base_rate_visible_bias` of the training data; None uses 0 (uniform base).
    betas: explicit schedule (K + 1,), overriding ``n_betas``.

    Returns (log_z, std_error). With weights w_i, r = mean(w) and s = std(w) (ddof 1),
    log_z = log Z_0 + log r, and by the delta method se(log r) = se(r) / r
    = s / (sqrt(n_chains) r), computed on weights rescaled by their maximum.
    """
    W, b_v, b_h = rbm.W, rbm.b_v, rbm.b_h
    if base_visible_bias is None:
        base_visible_bias = torch.zeros_like(b_v)
    if betas is None:
        betas = default_beta_schedule(n_betas)
    if n_chains < 2:
        raise ValueError(f"n_chains must be at least 2 for a standard error, got {n_chains}")
    log_w = ais_log_weights(
        W, b_v, b_h, base_visible_bias, betas, n_chains=n_chains, generator=generator
    )
    b_a = base_visible_bias.detach().double()
    log_z0 = W.shape[1] * math.log(2.0) + float(F.softplus(b_a).sum())
    log_mean_w = float(torch.logsumexp(log_w, 0)) - math.log(n_chains)
    w = torch.exp(log_w - log_w.max())
    std_error = float(w.std() / (math.sqrt(n_chains) * w.mean()))
    return AISResult(log_z0 + log_mean_w, std_error)


def average_log_prob(rbm, v: Tensor, log_z: float | Tensor) -> float:
    """Mean over the rows of binary v (N, V) of log p(v) = -F(v) - log Z, in float64.

    The hiddens are summed out analytically (free energy); only log Z is estimated.
    """
    W = rbm.W.detach().double()
    check_batch(v, W.shape[0], "v")
    check_binary(v, "v")
    v = v.double()
    neg_f = v @ rbm.b_v.detach().double() + F.softplus(
        torch.addmm(rbm.b_h.detach().double(), v, W)
    ).sum(-1)
    return float(neg_f.mean()) - float(log_z)
