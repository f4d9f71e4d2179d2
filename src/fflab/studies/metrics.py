"""Calibration and selective-prediction measures as pure functions of tensors.

Shapes: ``N`` predictions. ``p`` (N,) are predicted probabilities of the positive class and
``target`` (N,) the outcomes (1 positive, 0 negative); ``confidence`` (N,) any score that is
high when a prediction is trusted and ``correct`` (N,) whether it was right.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reliability(p: Tensor, target: Tensor, bins: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Reliability diagram on ``bins`` equal-width bins of [0, 1]: (mean p, fraction positive,
    count), each (bins,); empty bins have mean and fraction NaN and count 0.

    A prediction of exactly 1 falls into the last bin.
    """
    p, target = p.double().flatten(), target.double().flatten()
    idx = (p * bins).long().clamp_(0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    sum_p = torch.bincount(idx, weights=p, minlength=bins)
    sum_t = torch.bincount(idx, weights=target, minlength=bins)
    nan = torch.full_like(count, float("nan"))
    seen = count > 0
    mean_p = torch.where(seen, sum_p / count.clamp(min=1), nan)
    frac = torch.where(seen, sum_t / count.clamp(min=1), nan)
    return mean_p, frac, count


def expected_calibration_error(p: Tensor, target: Tensor, bins: int = 10) -> float:
    """ECE: the count-weighted mean over bins of |fraction positive - mean p|."""
    mean_p, frac, count = reliability(p, target, bins)
    seen = count > 0
    return float(((frac - mean_p).abs()[seen] * count[seen]).sum() / count.sum())


def mean_overconfidence(p: Tensor, target: Tensor) -> float:
    """Signed miscalibration: the mean over predictions of ``p - t`` where ``p >= 1/2`` and
    ``t - p`` where ``p < 1/2``.

    Positive: predictions are more extreme than their outcomes (over-confident); negative:
    less extreme (under-confident); about 0 for a calibrated predictor.
    """
    p, target = p.double().flatten(), target.double().flatten()
    high = p >= 0.5
    over_high = (p[high] - target[high]).sum()  # predicted high, outcome lower
    over_low = (target[~high] - p[~high]).sum()  # predicted low, outcome higher
    return float((over_high + over_low) / max(p.numel(), 1))


def risk_coverage(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Selective prediction: coverage k/N and the error among the k most confident, k = 1..N.

    Ties in confidence are broken by the order of the input (a stable sort), so the curve is
    deterministic.
    """
    order = torch.sort(confidence.double().flatten(), descending=True, stable=True).indices
    wrong = (~correct.flatten().bool()).double()[order]
    k = torch.arange(1, wrong.numel() + 1, dtype=torch.float64)
    return k / wrong.numel(), wrong.cumsum(0) / k


def area_under_risk_coverage(confidence: Tensor, correct: Tensor) -> float:
    """AURC: the mean of the risk over coverages 1/N..1 (lower is a better confidence)."""
    return float(risk_coverage(confidence, correct)[1].mean())


def risk_at_coverage(confidence: Tensor, correct: Tensor, coverage: float) -> float:
    """Error among the ``coverage`` most confident fraction (at least one prediction)."""
    cov, risk = risk_coverage(confidence, correct)
    k = max(int(round(coverage * cov.numel())), 1)
    return float(risk[k - 1])
