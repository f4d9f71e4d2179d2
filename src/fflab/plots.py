"""PNG plots of runs (needs the ``plot`` extra: matplotlib). Never imported by the core."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'fflab[plot]'") from None
    return plt


def _save_png(plt, fig, out: Path, dpi: int) -> Path:
    """Write ``fig`` to ``out`` through a temporary file and a rename (never half a PNG)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def accuracy_curve(run_dir: Path, key: str = "test_error_goodness") -> tuple[list, list]:
    """(training minutes, ``key`` in percent) after each epoch that logged ``key``.

    Time is the cumulative training time of the epochs (their ``seconds``), which leaves out
    the per-epoch evaluation that only exists to draw the curve.
    """
    rows = read_metrics(run_dir)
    if not any(key in r for r in rows):
        raise ValueError(
            f"{run_dir}: no per-epoch {key} (train with --set train.log_test_error=true)"
        )
    minutes, errors, total = [], [], 0.0
    for r in rows:
        total += r["seconds"]
        if key in r:
            minutes.append(total / 60)
            errors.append(r[key])
    return minutes, errors


def minutes_to_reach(minutes: list, errors: list, bar: float) -> float | None:
    """The first time at which the error is at most ``bar`` (None if it never is)."""
    return next((t for t, e in zip(minutes, errors, strict=True) if e <= bar), None)


_ERROR_TICKS = [
    0.5,
    0.6,
    0.8,
    1,
    1.1,
    1.2,
    1.3,
    1.4,
    1.5,
    1.6,
    1.8,
    2,
    2.5,
    3,
    4,
    5,
    7,
    10,
    15,
    20,
    30,
]
_ERROR_TICKS += [50, 70, 100]


def time_to_accuracy(run_dirs: list[Path], out: Path, key: str = "test_error_goodness") -> Path:
    """Plot ``key`` (percent) against cumulative training time for each run; write a PNG."""
    curves = [(d, *accuracy_curve(d, key)) for d in run_dirs]  # fail before drawing
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d, minutes, errors in curves:
        config = json.loads((Path(d) / "config.json").read_text())
        label = f"{config['preset']}, seed {config.get('seed', '?')}"
        ax.plot(minutes, errors, marker=".", label=label)
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    # plain percentages, dense enough that the last tenths of a percent can be read off
    every = [e for _, _, errors in curves for e in errors]
    lo, hi = min(every, default=1.0), max(every, default=10.0)
    ticks = [t for t in _ERROR_TICKS if lo / 1.15 <= t <= hi * 1.15]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("training wall time (minutes)")
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_png(plt, fig, out, dpi=120)


def image_grid(
    images: Tensor,
    out: Path,
    shape: tuple[int, int] = (28, 28),
    cols: int = 10,
    title: str | None = None,
    symmetric: bool = False,
) -> Path:
    """Save rows of ``images`` (N, H*W) as one grid PNG (filters: ``symmetric`` colour scale)."""
    plt = _pyplot()
    n = images.shape[0]
    rows = (n + cols - 1) // cols
    imgs = images.detach().float().cpu().reshape(n, *shape).numpy()  # imshow wants numpy
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + (0.4 if title else 0)))
    for i, a in enumerate(axes.flat if rows * cols > 1 else [axes]):
        a.axis("off")
        if i < n:
            im = imgs[i]
            if symmetric:
                v = float(abs(im).max()) or 1.0
                a.imshow(im, cmap="RdBu_r", vmin=-v, vmax=v)
            else:
                a.imshow(im, cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_png(plt, fig, out, dpi=100)


def boltzmann_figures(
    run_dir: Path, *, n_chains: int = 100, n_steps: int = 1000, seed: int = 0
) -> list[Path]:
    """``filters.png`` and ``samples.png`` of an ``rbm`` run directory; returns their paths.

    filters: the first 100 columns of W (the hidden units' receptive fields), each on its
    own symmetric colour scale. samples: p(v | h) at the end of ``n_chains`` independent
    block Gibbs chains of ``n_steps`` steps, started from the visible biases (seeded).
    """
    import math

    import torch

    from fflab.boltzmann.rbm_experiment import load_rbm, rbm_gibbs_samples

    run_dir = Path(run_dir)
    rbm = load_rbm(run_dir)
    side = math.isqrt(rbm.n_visible)
    shape = (side, side) if side * side == rbm.n_visible else (1, rbm.n_visible)
    n_filters = min(100, rbm.n_hidden)
    filters = image_grid(
        rbm.W.detach()[:, :n_filters].T,
        run_dir / "filters.png",
        shape,
        title=f"first {n_filters} of {rbm.n_hidden} filters (columns of W)",
        symmetric=True,
    )
    g = torch.Generator().manual_seed(seed)
    samples = rbm_gibbs_samples(rbm, n_chains, n_steps, generator=g)
    grid = image_grid(
        samples,
        run_dir / "samples.png",
        shape,
        title=f"p(v | h) after {n_steps} Gibbs steps ({n_chains} chains)",
    )
    return [filters, grid]


def recurrent_figure(run_dir: Path, out: Path | None = None, results: str = "summary.json") -> Path:
    """``iterations.png`` of an ``ff-recurrent`` run from its ``results`` file (``summary.json``
    or ``fflab eval``'s ``eval.json``); returns its path.

    Left: test error against the iterations used at test time, scoring by the goodness of one
    iteration alone and by iterations 1..t summed, with the scoring window's error marked.
    Right: mean goodness (over the threshold) of every layer at every iteration, with the
    true label (solid) and with the wrong labels (dashed).
    """
    run_dir = Path(run_dir)
    path = run_dir / results
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {results} (the run has not finished)")
    s = json.loads(path.read_text())
    if "error_by_iteration" not in s:
        raise ValueError(f"{run_dir} is not a recurrent FF run (no error_by_iteration)")
    config = json.loads((run_dir / "config.json").read_text())
    hidden = config["model"]["hidden"]
    threshold = config["model"].get("threshold")
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    its = list(range(1, len(s["error_by_iteration"]) + 1))
    ax.plot(its, s["error_by_iteration"], marker="o", label="iteration t alone")
    ax.plot(its, s["error_up_to_iteration"], marker="s", label="iterations 1..t summed")
    lo, hi = s["score_window"]
    ax.axvspan(lo - 0.5, hi + 0.5, color="0.9", zorder=0)
    ax.axhline(s["test_error_goodness"], color="k", lw=0.8, ls=":")
    ax.annotate(
        f"iterations {lo}-{hi}: {s['test_error_goodness']:.2f}%",
        (hi + 0.5, s["test_error_goodness"]),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=8,
    )
    ax.set(xlabel="iteration t at test time", ylabel="test error (%)", xticks=its)
    ax.legend(fontsize=8)
    pos, neg = s["goodness_pos"], s["goodness_neg"]
    for i, width in enumerate(hidden):
        theta = threshold if threshold is not None else width
        (line,) = bx.plot(its, [row[i] / theta for row in pos], label=f"layer {i} true label")
        bx.plot(its, [row[i] / theta for row in neg], ls="--", color=line.get_color())
    bx.axhline(1.0, color="k", lw=0.8, ls=":")
    bx.set(xlabel="iteration t", ylabel="mean goodness / threshold", xticks=its)
    bx.legend(fontsize=8, title="dashed: wrong labels", title_fontsize=8)
    fig.suptitle(f"{config['preset']} (seed {config['seed']}): {len(hidden)} x {hidden[0]}")
    fig.tight_layout()
    return _save_png(plt, fig, out or run_dir / "iterations.png", dpi=110)
