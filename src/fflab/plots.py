"""PNG plots of runs (needs the ``plot`` extra: matplotlib). Never imported by the core."""

from __future__ import annotations

import json
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


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def time_to_accuracy(run_dirs: list[Path], out: Path, key: str = "test_error_goodness") -> Path:
    """Plot ``key`` (percent) against cumulative wall time for each run; write a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in run_dirs:
        m = [r for r in read_metrics(d) if key in r]
        if not m:
            raise ValueError(
                f"{d}: no per-epoch {key} (train with --set train.log_test_error=true)"
            )
        label = json.loads((Path(d) / "config.json").read_text())["preset"]
        ax.plot([r["wall_seconds"] / 60 for r in m], [r[key] for r in m], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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
    imgs = images.detach().float().cpu().reshape(n, *shape)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + (0.4 if title else 0)))
    for i, a in enumerate(axes.flat if rows * cols > 1 else [axes]):
        a.axis("off")
        if i < n:
            im = imgs[i]
            if symmetric:
                v = float(im.abs().max()) or 1.0
                a.imshow(im, cmap="RdBu_r", vmin=-v, vmax=v)
            else:
                a.imshow(im, cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
