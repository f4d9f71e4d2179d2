"""Dead and always-on units: do they persist, does peer normalization prevent them, and does
it matter for the error?

A unit is *dead* in an epoch if it was active (ReLU output > 0) on none of the epoch's
positive rows, *always on* if it was active on every one; the FF trainer counts both during
training (``dead_L`` and ``always_on_L`` in ``metrics.jsonl``). The study trains supervised
and unsupervised nets at several peer-normalization strengths (``model.peer_norm``; 0.06 in
fflab's units is Hinton's 0.03) and reports the fractions per layer over training next to each
net's test error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fflab.checkpoint import atomic_write_text
from fflab.studies import StudyContext, run_data, standard_error

DESCRIPTION = (
    "fraction of dead and always-on units per layer over training, with and without peer "
    "normalization at several strengths, supervised and unsupervised, against test error"
)
SUPERVISED_STRENGTHS = (0.0, 0.02, 0.06, 0.2)
UNSUPERVISED_STRENGTHS = (0.0, 0.06, 0.2)


def _runs(ctx: StudyContext) -> dict[str, tuple[str, dict[str, Any]]]:
    hidden = [500] * 3 if ctx.quick else [1000] * 3
    epochs = 6 if ctx.quick else 32
    runs = {}
    for s in SUPERVISED_STRENGTHS:
        runs[f"supervised-peer{s:g}"] = (
            "mnist-ff-quick",
            {"model": {"hidden": hidden, "peer_norm": s}, "train": {"epochs": epochs}},
        )
    for s in UNSUPERVISED_STRENGTHS:
        runs[f"unsupervised-peer{s:g}"] = (
            "mnist-ff-unsup-quick",
            {
                "model": {"hidden": hidden, "peer_norm": s},
                "train": {"epochs": epochs, "probe_epochs": 10 if ctx.quick else 40},
            },
        )
    return runs


def unit_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """Per layer, the dead and always-on fractions after every epoch of a run."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    n_layers = sum(1 for k in rows[0] if k.startswith("dead_"))
    return {
        "dead": [[r[f"dead_{i}"] for r in rows] for i in range(n_layers)],
        "always_on": [[r[f"always_on_{i}"] for r in rows] for i in range(n_layers)],
    }


def run(ctx: StudyContext) -> dict[str, Any]:
    results: dict[str, Any] = {"runs": {}}
    for name, (preset, settings) in _runs(ctx).items():
        run_dir = ctx.train(name, preset, settings)
        summary = json.loads((run_dir / "summary.json").read_text())
        key = "test_error_goodness" if name.startswith("supervised") else "test_error_probe"
        results["runs"][name] = {
            "peer_norm": settings["model"]["peer_norm"],
            "test_error": summary[key],
            "error_kind": key,
            "n_test": len(run_data(run_dir, ctx)[1]),
            **unit_curves(run_dir),
        }
    write_report(ctx.out_dir, results, ctx.quick)
    return results


def _figure(out_dir: Path, results: dict[str, Any]) -> str | None:
    try:
        from fflab.plots import _pyplot, _save_png

        plt = _pyplot()
    except RuntimeError:
        return None
    groups = ("supervised", "unsupervised")
    n_layers = max(len(r["dead"]) for r in results["runs"].values())
    fig, axes = plt.subplots(2, n_layers, figsize=(3.3 * n_layers, 5.5), squeeze=False)
    for row, group in enumerate(groups):
        for i in range(n_layers):
            ax = axes[row][i]
            for name, r in results["runs"].items():
                if not name.startswith(group) or i >= len(r["dead"]):
                    continue
                epochs = range(1, len(r["dead"][i]) + 1)
                (line,) = ax.plot(epochs, [100 * v for v in r["dead"][i]],
                                  label=f"peer {r['peer_norm']:g}")  # fmt: skip
                ax.plot(epochs, [100 * v for v in r["always_on"][i]], ls="--",
                        color=line.get_color())  # fmt: skip
            ax.set_title(f"{group}, layer {i}", fontsize=9)
            ax.set(xlabel="epoch", ylabel="% of units")
            ax.legend(fontsize=7, title="solid dead, dashed always on", title_fontsize=7)
    fig.tight_layout()
    _save_png(plt, fig, out_dir / "units.png", dpi=100)
    return "units.png"


def write_report(out_dir: Path, results: dict[str, Any], quick: bool) -> Path:
    runs = results["runs"]
    lines = [
        "# Dead and always-on units" + (" (quick)" if quick else ""),
        "",
        "Fractions of each layer's units that were active on none (dead) or on all (always "
        "on) of an epoch's positive rows, at the last epoch, and the net's test error.",
        "",
        "| net | peer norm | test error | dead per layer (last epoch) | always on per layer |",
        "|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        dead = ", ".join(f"{100 * d[-1]:.1f}%" for d in r["dead"])
        on = ", ".join(f"{100 * a[-1]:.1f}%" for a in r["always_on"])
        lines.append(f"| {name} | {r['peer_norm']:g} | {r['test_error']:.2f}% | {dead} | {on} |")
    lines += ["", "## Answer", ""]
    for group in ("supervised", "unsupervised"):
        members = {k: r for k, r in runs.items() if k.startswith(group)}
        if not members:
            continue
        off = next((r for r in members.values() if r["peer_norm"] == 0), None)
        if off is not None:
            worst = max(d[-1] for d in off["dead"])
            persist = all(d[-1] >= 0.5 * max(d) and max(d) > 0 for d in off["dead"] if max(d) > 0)
            fate = "persist (at least half of the most seen remain)" if persist else "recover"
            lines.append(
                f"- {group}, no peer normalization: up to {100 * worst:.1f}% of a layer's units "
                f"are dead at the end; dead units {fate}."
            )
        best = min(members.values(), key=lambda r: r["test_error"])
        se = standard_error(best["test_error"], best["n_test"])
        lines.append(
            f"- {group}: the lowest test error, {best['test_error']:.2f}%, is at peer norm "
            f"{best['peer_norm']:g}; "
            + "; ".join(
                f"{r['peer_norm']:g}: {r['test_error']:.2f}% with "
                f"{100 * max(d[-1] for d in r['dead']):.1f}% dead"
                for r in members.values()
            )
            + f". One standard error of these errors is about {se:.2f} points: differences "
            "under two of them are not resolved by one seed."
        )
    fig = _figure(out_dir, results)
    if fig:
        lines += ["", f"![{fig}]({fig})"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
