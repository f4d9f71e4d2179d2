"""What does goodness say? Calibration, confidence and the layers that count.

FF trains each layer as a logistic classifier of "positive or negative" with the logit
``G - theta``: so ``sigmoid(G - theta)`` is, by construction, the layer's estimate of the
probability that its input is positive *under the training mix* (half positives, half the
training negatives). The study measures, on held-out data:

1. **Calibration** per layer: reliability diagram and expected calibration error (ECE, 10
   bins) of ``sigmoid(G - theta)``, supervised (positives: test images with their label;
   negatives: with a wrong label drawn uniformly, and with the hardest wrong label) and
   unsupervised (positives: test images; negatives: hybrids of test images).
2. **Confidence**: the margin between the best and second-best label score as the
   confidence of goodness scoring, against the softmax head's top probability: risk-coverage
   curves (error when the least confident are refused), their area (AURC) and the error at
   90% and 80% coverage.
3. **Which layers count**: goodness-scoring error for every contiguous range of layers.
4. **theta**: the same measures for nets trained with the threshold at 0.5, 1 and 2 times
   the layer width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

import fflab
from fflab.ff.functional import positive_logit
from fflab.ff.model import FFNet
from fflab.negatives import hybrid_images, random_wrong_labels
from fflab.studies import StudyContext, run_data
from fflab.studies.metrics import (
    area_under_risk_coverage,
    expected_calibration_error,
    mean_overconfidence,
    reliability,
    risk_at_coverage,
    risk_coverage,
)

DESCRIPTION = (
    "is sigmoid(G - theta) a calibrated probability; goodness margin vs softmax as a "
    "confidence; which layers to sum; how theta moves it"
)
THETA_FACTORS = (0.5, 1.0, 2.0)


def _runs(ctx: StudyContext) -> dict[str, dict[str, Any]]:
    """The nets the study trains: name -> (preset, settings)."""
    hidden = list(ctx.settings.get("model", {}).get("hidden", [500 if ctx.quick else 1000] * 3))
    width = hidden[0]
    if any(h != width for h in hidden):
        raise ValueError(f"the goodness study needs hidden layers of one width, got {hidden}")
    sup_epochs, unsup_epochs = (6, 6) if ctx.quick else (32, 32)
    runs = {}
    for f in THETA_FACTORS:
        runs[f"supervised-theta{f:g}"] = (
            "mnist-ff-quick",
            {
                "model": {"hidden": hidden, "threshold": f * width},
                "train": {"epochs": sup_epochs},
            },
        )
    runs["unsupervised"] = (
        "mnist-ff-unsup-quick",
        {
            "model": {"hidden": hidden},
            "train": {"epochs": unsup_epochs, "probe_epochs": 10 if ctx.quick else 40},
        },
    )
    return runs


def layer_probabilities(net: FFNet, g: Tensor) -> Tensor:
    """``sigmoid(G - theta)`` (the sign flipped for ``minssq``) of goodness g (..., L)."""
    theta = torch.tensor([net.theta(i) for i in range(net.num_layers)], dtype=g.dtype)
    return torch.sigmoid(positive_logit(g, theta, net.config.goodness))


def calibration(p_pos: Tensor, p_neg: Tensor) -> dict[str, Any]:
    """ECE, signed miscalibration and the reliability diagram of one layer's probabilities on
    positives (N,) and negatives (M,)."""
    p = torch.cat([p_pos, p_neg])
    t = torch.cat([torch.ones_like(p_pos), torch.zeros_like(p_neg)])
    mean_p, frac, count = reliability(p, t)
    return {
        "ece": expected_calibration_error(p, t),
        "overconfidence": mean_overconfidence(p, t),
        "accuracy": float(((p >= 0.5).double() == t).double().mean()),
        "bins": {
            "mean_p": mean_p.tolist(),
            "fraction_positive": frac.tolist(),
            "count": count.tolist(),
        },
    }


def supervised_measures(net: FFNet, x: Tensor, y: Tensor, seed: int) -> dict[str, Any]:
    """Calibration (random and hardest wrong labels), confidence and layer ranges of a net."""
    g = torch.cat([net.label_goodness(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    n, c, n_layers = g.shape
    p = layer_probabilities(net, g)  # (N, C, L)
    rows = torch.arange(n)
    wrong = random_wrong_labels(y, c, torch.Generator().manual_seed(seed))
    s = positive_logit(g, 0.0, net.config.goodness)  # (N, C, L)
    score = s[..., net.config.score_from :].sum(2)  # (N, C)
    masked = score.clone()
    masked[rows, y] = -math.inf
    hardest = masked.argmax(1)  # the wrong label the scorer likes best
    out: dict[str, Any] = {"layers": []}
    for i in range(n_layers):
        pos = p[rows, y, i]
        out["layers"].append(
            {
                "random_wrong": calibration(pos, p[rows, wrong, i]),
                "hardest_wrong": calibration(pos, p[rows, hardest, i]),
            }
        )
    # confidence: margin of the top two label scores vs the softmax head's top probability
    top2 = score.topk(2, dim=1).values
    pred = score.argmax(1)
    head = torch.softmax(
        torch.cat([net.head_logits(x[i : i + 1000]) for i in range(0, n, 1000)]), 1
    )
    conf = {"goodness_margin": (top2[:, 0] - top2[:, 1], pred == y)}
    conf["softmax_top_probability"] = (head.max(1).values, head.argmax(1) == y)
    out["confidence"] = {}
    for name, (confidence, correct) in conf.items():
        cov, risk = risk_coverage(confidence, correct)
        keep = torch.linspace(0, n - 1, 101).round().long()
        out["confidence"][name] = {
            "error": 100.0 * float((~correct).double().mean()),
            "aurc": 100.0 * area_under_risk_coverage(confidence, correct),
            "error_at_90": 100.0 * risk_at_coverage(confidence, correct, 0.9),
            "error_at_80": 100.0 * risk_at_coverage(confidence, correct, 0.8),
            "curve": {"coverage": cov[keep].tolist(), "risk": (100.0 * risk[keep]).tolist()},
        }
    # which layers count: every contiguous range first..last
    out["layer_ranges"] = [
        {
            "first": a,
            "last": b,
            "error": 100.0 * float((s[..., a : b + 1].sum(2).argmax(1) != y).double().mean()),
        }
        for a in range(n_layers)
        for b in range(a, n_layers)
    ]
    return out


def unsupervised_measures(
    net: FFNet, x: Tensor, image_shape: tuple[int, int], blurs: int, seed: int
) -> dict[str, Any]:
    """Calibration of every layer on test images (positive) and their hybrids (negative)."""
    gen = torch.Generator().manual_seed(seed)
    neg = torch.cat(
        [hybrid_images(x[i : i + 1000], image_shape, gen, blurs) for i in range(0, len(x), 1000)]
    )
    with torch.no_grad():
        g_pos = torch.cat([net(x[i : i + 1000]).goodness for i in range(0, len(x), 1000)])
        g_neg = torch.cat([net(neg[i : i + 1000]).goodness for i in range(0, len(x), 1000)])
    p_pos, p_neg = layer_probabilities(net, g_pos), layer_probabilities(net, g_neg)
    return {
        "layers": [{"hybrid": calibration(p_pos[:, i], p_neg[:, i])} for i in range(net.num_layers)]
    }


def run(ctx: StudyContext) -> dict[str, Any]:
    results: dict[str, Any] = {"runs": {}}
    for name, (preset, settings) in _runs(ctx).items():
        run_dir = ctx.train(name, preset, settings)
        net = fflab.load_run(run_dir)
        config, test = run_data(run_dir, ctx)
        if net.config.supervised:
            m = supervised_measures(net, test.x, test.y, ctx.seed)
        else:
            shape = tuple(net.config.image_shape[1:])
            m = unsupervised_measures(net, test.x, shape, config.train.blurs, ctx.seed)
        m["theta"] = [net.theta(i) for i in range(net.num_layers)]
        m["n_test"] = len(test)
        m["run_dir"] = str(run_dir)
        results["runs"][name] = m
    from fflab.studies.goodness_report import write_report

    write_report(ctx.out_dir, results, quick=ctx.quick)
    return results
