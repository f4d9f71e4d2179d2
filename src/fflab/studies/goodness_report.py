"""The goodness study's report: ``report.md`` and its figures, from the measured results.

Every sentence of the answer is chosen by the numbers (thresholds stated in the text), so the
report says what this run measured, not what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fflab.checkpoint import atomic_write_text
from fflab.studies import standard_error

WELL_CALIBRATED = 0.02  # ECE below this: "calibrated" in the report's wording


def _verdict(cal: dict[str, Any]) -> str:
    if cal["ece"] < WELL_CALIBRATED:
        return "calibrated"
    return "over-confident" if cal["overconfidence"] > 0 else "under-confident"


def figures(out_dir: Path, results: dict[str, Any]) -> list[str]:
    """reliability.png and risk_coverage.png; returns their file names (none without
    matplotlib)."""
    try:
        from fflab.plots import _pyplot, _save_png

        plt = _pyplot()
    except RuntimeError:
        return []
    runs = results["runs"]
    panels = [
        (name, kind, layer)
        for name, r in runs.items()
        for i, layer in enumerate(r["layers"])
        for kind in layer
        if name in ("supervised-theta1", "unsupervised")
    ]
    names = []
    if panels:
        cols = max(len(r["layers"]) for r in runs.values())
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        counts: dict[tuple[str, str], int] = {}
        for ax, (name, kind, layer) in zip(axes.flat, panels, strict=False):
            i = counts[(name, kind)] = counts.get((name, kind), -1) + 1
            cal = layer[kind]
            b = cal["bins"]
            ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
            ax.plot(b["mean_p"], b["fraction_positive"], marker="o")
            ax.set_title(f"{name} L{i}, {kind}\nECE {cal['ece']:.3f}", fontsize=8)
            ax.set(xlim=(0, 1), ylim=(0, 1))
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.supxlabel("mean sigmoid(G - theta) in bin")
        fig.supylabel("fraction positive")
        fig.tight_layout()
        _save_png(plt, fig, out_dir / "reliability.png", dpi=100)
        names.append("reliability.png")
    sup = {k: r for k, r in runs.items() if "confidence" in r}
    if sup:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in sup.items():
            for conf, c in r["confidence"].items():
                ls = "-" if conf == "goodness_margin" else "--"
                ax.plot(c["curve"]["coverage"], c["curve"]["risk"], ls=ls, label=f"{name}: {conf}")
        ax.set(xlabel="coverage (fraction of test images answered)", ylabel="error (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save_png(plt, fig, out_dir / "risk_coverage.png", dpi=100)
        names.append("risk_coverage.png")
    return names


def write_report(out_dir: Path, results: dict[str, Any], quick: bool = False) -> Path:
    """Write ``report.md`` (and the figures) into ``out_dir``; returns its path."""
    runs = results["runs"]
    pics = figures(out_dir, results)
    lines = [
        "# Goodness study" + (" (quick)" if quick else ""),
        "",
        "Each FF layer is trained as a logistic classifier of positive against negative data "
        "with the logit G - theta, in equal proportions. So sigmoid(G - theta) is the layer's "
        "estimate of P(positive) under the training mix, not a probability of anything else.",
        "",
        "## Calibration of sigmoid(G - theta), per layer",
        "",
        f"ECE on 10 bins; 'calibrated' means ECE < {WELL_CALIBRATED}; 'over-confident' means "
        "the probabilities are more extreme than the outcomes.",
        "",
        "| net | layer | negatives | ECE | miscalibration | accuracy | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        for i, layer in enumerate(r["layers"]):
            for kind, cal in layer.items():
                lines.append(
                    f"| {name} | {i} | {kind} | {cal['ece']:.3f} | {cal['overconfidence']:+.3f} "
                    f"| {100 * cal['accuracy']:.1f}% | {_verdict(cal)} |"
                )
    sup = {k: r for k, r in runs.items() if "confidence" in r}
    if sup:
        lines += [
            "",
            "## Confidence: goodness margin against the softmax head",
            "",
            "Error of all answers, the area under the risk-coverage curve (AURC, lower is a "
            "better confidence), and the error when the least confident 10% and 20% are "
            "refused.",
            "",
            "| net | confidence | error | AURC | error at 90% | error at 80% |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in sup.items():
            for conf, c in r["confidence"].items():
                lines.append(
                    f"| {name} | {conf} | {c['error']:.2f}% | {c['aurc']:.3f}% | "
                    f"{c['error_at_90']:.2f}% | {c['error_at_80']:.2f}% |"
                )
        lines += ["", "## Which layers' goodness to sum", ""]
        lines += ["| net | layers | error |", "|---|---|---|"]
        for name, r in sup.items():
            for rng in r["layer_ranges"]:
                lines.append(f"| {name} | {rng['first']}..{rng['last']} | {rng['error']:.2f}% |")
    lines += ["", "## Answer", ""] + answer(runs)
    if pics:
        lines += ["", *(f"![{p}]({p})" for p in pics)]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def answer(runs: dict[str, Any]) -> list[str]:
    """Plain-language findings, each chosen by the measured numbers."""
    out = []
    for name, r in runs.items():
        verdicts = {
            kind: [_verdict(layer[kind]) for layer in r["layers"]] for kind in r["layers"][0]
        }
        for kind, v in verdicts.items():
            eces = ", ".join(f"{layer[kind]['ece']:.3f}" for layer in r["layers"])
            out.append(f"- {name}, {kind} negatives: layers are {', '.join(v)} (ECE {eces}).")
        if "confidence" in r:
            g, s = r["confidence"]["goodness_margin"], r["confidence"]["softmax_top_probability"]
            better = "goodness margin" if g["aurc"] < s["aurc"] else "softmax top probability"
            out.append(
                f"- {name}: as a confidence, the {better} ranks answers better (AURC "
                f"{g['aurc']:.3f}% for the margin, {s['aurc']:.3f}% for the softmax head)."
            )
            best = min(r["layer_ranges"], key=lambda x: x["error"])
            out.append(
                f"- {name}: the best layers to sum are {best['first']}..{best['last']} "
                f"({best['error']:.2f}% error)."
            )
    thetas = {k: r for k, r in runs.items() if k.startswith("supervised-theta")}
    if len(thetas) > 1:
        errs = ", ".join(
            f"{k.removeprefix('supervised-')}: {r['confidence']['goodness_margin']['error']:.2f}%"
            for k, r in thetas.items()
        )
        mean_ece = ", ".join(
            f"{k.removeprefix('supervised-')}: "
            f"{sum(x['random_wrong']['ece'] for x in r['layers']) / len(r['layers']):.3f}"
            for k, r in thetas.items()
        )
        first = next(iter(thetas.values()))
        se = standard_error(first["confidence"]["goodness_margin"]["error"], first["n_test"])
        out.append(
            f"- theta (factor of the layer width): test error {errs}; mean ECE {mean_ece}. One "
            f"standard error of these errors is about {se:.2f} points: differences under two "
            "of them are not resolved by one seed."
        )
    return out
