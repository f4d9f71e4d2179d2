"""Which negatives? The FF paper's remark that defining negative data is the hard part.

Supervised FF: the image with a uniformly random wrong label (``random``) against a wrong
label drawn in proportion to the softmax head's probabilities (``hard``, Hinton's code).
Unsupervised FF (linear-probe error): hybrid images under masks blurred 1, 3, 6 or 12 times
(few blurs: small, speckled regions; many: large ones), against two other sources of
:mod:`fflab.negatives`: ``permuted`` (each image's pixels shuffled, a fresh permutation per
image: an easy negative, separable by per-pixel means) and ``unmasked`` (another real image as
it is: positives and negatives from one distribution, the degenerate case).

Every net logs its test error after every epoch (``train.log_test_error``), so the study
reads the error against epochs and against training time (the epochs' ``seconds``, which
leave out the per-epoch evaluation) from each run's ``metrics.jsonl``. The runs follow one
another on a machine whose load may change, so the cost of each source is also measured in
one process, interleaved: one draw of every source on a batch of test images against one
training step of the nets (:func:`draw_costs`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fflab.checkpoint import atomic_write_text
from fflab.studies import StudyContext, run_data, standard_error

DESCRIPTION = (
    "which negatives: random vs hard wrong labels (supervised); hybrid masks with 1-12 "
    "blurs vs permuted pixels vs an unmasked second image (unsupervised); error vs epochs "
    "and vs training time"
)
SUPERVISED_SOURCES = ("random", "hard")
BLURS = (1, 3, 6, 12)
OTHER_UNSUPERVISED = ("permuted", "unmasked")
ERROR_KEY = {"supervised": "test_error_goodness", "unsupervised": "test_error_probe"}
REFERENCE = {"supervised": "supervised-random", "unsupervised": "unsupervised-hybrid-blurs6"}
# the figures' test-error ticks (percent, on a log axis)
ERROR_TICKS = (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 15, 20, 30, 50, 70, 100)


def _runs(ctx: StudyContext) -> dict[str, tuple[str, dict[str, Any]]]:
    """The nets the study trains: name -> (preset, settings)."""
    hidden = [500] * 3 if ctx.quick else [1000] * 3
    epochs = 6 if ctx.quick else 32
    # every epoch's test error; a full-length probe per epoch would cost more than the
    # epoch, so the full study evaluates every 4th epoch
    every = {"eval_every": 1 if ctx.quick else 4}
    train = {"epochs": epochs, "log_test_error": True}
    unsup = {**train, "probe_epochs": 10 if ctx.quick else 40}
    runs = {}
    for source in SUPERVISED_SOURCES:
        runs[f"supervised-{source}"] = (
            "mnist-ff-quick",
            {"data": every, "model": {"hidden": hidden}, "train": {**train, "negatives": source}},
        )
    for b in BLURS:
        runs[f"unsupervised-hybrid-blurs{b}"] = (
            "mnist-ff-unsup-quick",
            {
                "data": every,
                "model": {"hidden": hidden},
                "train": {**unsup, "negatives": "hybrid", "blurs": b},
            },
        )
    for source in OTHER_UNSUPERVISED:
        runs[f"unsupervised-{source}"] = (
            "mnist-ff-unsup-quick",
            {"data": every, "model": {"hidden": hidden}, "train": {**unsup, "negatives": source}},
        )
    return runs


def error_curve(rows: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """The epochs that logged ``key``, their error and the cumulative training seconds.

    ``rows``: the run's ``metrics.jsonl`` records in order. Time sums every epoch's
    ``seconds`` (training only) up to and including the epoch.
    """
    epochs, errors, seconds, total = [], [], [], 0.0
    for r in rows:
        total += r["seconds"]
        if key in r:
            epochs.append(r["epoch"])
            errors.append(r[key])
            seconds.append(total)
    return {"epoch": epochs, "error": errors, "seconds": seconds}


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def run(ctx: StudyContext) -> dict[str, Any]:
    results: dict[str, Any] = {"runs": {}}
    for name, (preset, settings) in _runs(ctx).items():
        run_dir = ctx.train(name, preset, settings)
        group = name.split("-")[0]
        key = ERROR_KEY[group]
        summary = json.loads((run_dir / "summary.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        rows = _read_rows(run_dir)
        n_layers = len(config["model"]["hidden"])
        last = rows[-1]
        results["runs"][name] = {
            "group": group,
            "negatives": config["train"]["negatives"],
            "blurs": config["train"]["blurs"] if config["train"]["negatives"] == "hybrid" else None,
            "test_error": summary[key],
            "error_kind": key,
            "n_test": len(run_data(run_dir, ctx)[1]),
            "curve": error_curve(rows, key),
            "seconds_per_epoch": sum(r["seconds"] for r in rows) / len(rows),
            # the last epoch's mean goodness of positive and negative rows, per layer
            "goodness_pos": [last[f"goodness_pos_{i}"] for i in range(n_layers)],
            "goodness_neg": [last[f"goodness_neg_{i}"] for i in range(n_layers)],
            "loss": [last[f"loss_{i}"] for i in range(n_layers)],
            # sumsq goodness (the presets'): theta defaults to the layer's width
            "theta": config["model"]["threshold"] or config["model"]["hidden"][-1],
            **({"test_error_softmax": summary["test_error_softmax"]} if group == "supervised"
               else {"test_error_probe_layers": summary["test_error_probe_layers"]}),
        }  # fmt: skip
    for group, ref in REFERENCE.items():
        base = results["runs"].get(ref)
        for r in results["runs"].values():
            if r["group"] == group and base is not None:
                r["time_ratio"] = r["seconds_per_epoch"] / base["seconds_per_epoch"]
    if REFERENCE["unsupervised"] in results["runs"]:
        results["untrained"] = untrained_probe(ctx, ctx.out_dir / REFERENCE["unsupervised"])
    results["draw_costs"] = draw_costs(ctx, results)
    results["figures"] = write_figures(ctx.out_dir, results)
    write_report(ctx.out_dir, results, ctx.quick)
    return results


def untrained_probe(ctx: StudyContext, run_dir: Path) -> dict[str, Any]:
    """The linear probe's test error on the features of the run's net *before* training (its
    initial weights, from the run's seed): what FF adds over random features. Cached in
    ``untrained.json`` in the study's directory."""
    cache = ctx.out_dir / "untrained.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from fflab import runs as run_loop
    from fflab.api import _datasets
    from fflab.presets import from_dict

    config = from_dict(json.loads((run_dir / "config.json").read_text()))
    given = None if ctx.data is None else _datasets(ctx.data)
    exp = run_loop.build_experiment(config, ctx.data_dir, torch.device("cpu"), given)
    summary = exp.evaluate()
    out = {
        "test_error": summary["test_error_probe"],
        "test_error_probe_layers": summary["test_error_probe_layers"],
        "n_test": len(exp.data.test),
    }
    atomic_write_text(cache, json.dumps(out, indent=2))
    return out


def _median_seconds(fns: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds, the functions interleaved in
    every round (so a change of the machine's load hits all of them alike) and the order
    rotated from round to round (so none always follows the same one)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            fn = fns[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def draw_costs(ctx: StudyContext, results: dict[str, Any], rounds: int = 100) -> dict[str, Any]:
    """Seconds per draw of every source the study trained with, and per training step of
    each group's reference net, measured interleaved on one batch of the run's test images.

    Returns ``{"batch_size", "step": {group: s}, "draw": {run name: s}, "draw_over_step":
    {run name: ratio}}``; the nets are fresh (initial weights): a step's cost does not
    depend on the weights.
    """
    from fflab.ff.model import FFNet
    from fflab.ff.train import FFTrainer, negative_source

    runs = results["runs"]
    fns, step_of = {}, {}
    for group, ref in REFERENCE.items():
        if ref not in runs:
            continue
        config, test = run_data(ctx.out_dir / ref, ctx)
        b = config.train.batch_size
        x, y = test.x[:b], test.y[:b]
        gen = torch.Generator().manual_seed(0)
        net = FFNet(config.model, generator=gen)
        trainer = FFTrainer(net, config.train)
        fns[f"step:{group}"] = lambda t=trainer, x=x, y=y, g=gen: t.step(x, y, g)
        probs = torch.softmax(torch.randn(len(y), config.model.num_classes, generator=gen), 1)
        for name, r in runs.items():
            if r["group"] != group:
                continue
            blurs = config.train.blurs if r["blurs"] is None else r["blurs"]
            tcfg = dataclasses.replace(config.train, negatives=r["negatives"], blurs=blurs)
            src = negative_source(net, tcfg)
            fns[name] = lambda s=src, x=x, y=y, g=gen, p=probs: s.draw(x, y, g, p)
            step_of[name] = group
    if not fns:
        return {}
    with torch.no_grad():
        med = _median_seconds(fns, rounds)
    return {
        "batch_size": b,
        "step": {k[5:]: v for k, v in med.items() if k.startswith("step:")},
        "draw": {k: med[k] for k in step_of},
        "draw_over_step": {k: med[k] / med[f"step:{g}"] for k, g in step_of.items()},
    }


def _label(r: dict[str, Any]) -> str:
    if r["blurs"] is None:
        return r["negatives"]
    return f"hybrid, {r['blurs']} blur" + ("" if r["blurs"] == 1 else "s")


def write_figures(out_dir: Path, results: dict[str, Any]) -> list[str]:
    """Test error against epochs and against training time, a panel per group."""
    try:
        from fflab.plots import _pyplot, _save_png

        plt = _pyplot()
    except RuntimeError:
        return []
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    written = []
    for axis, xlabel, fname in (
        ("epoch", "epoch", "error_vs_epoch.png"),
        ("seconds", "training time (s)", "error_vs_time.png"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11.5, 4), squeeze=False)
        for ax, group in zip(axes[0], ("supervised", "unsupervised"), strict=True):
            for r in results["runs"].values():
                if r["group"] != group or not r["curve"]["epoch"]:
                    continue
                ax.plot(r["curve"][axis], r["curve"]["error"], marker="o", ms=3, label=_label(r))
            if group == "unsupervised" and "untrained" in results:
                ax.axhline(results["untrained"]["test_error"], color="grey", ls="--", lw=1,
                           label="untrained net (random features)")  # fmt: skip
            kind = "goodness scoring" if group == "supervised" else "linear probe"
            ax.set_title(f"{group} FF ({kind})", fontsize=10)
            ax.set(xlabel=xlabel, ylabel="test error (%)", yscale="log")
            # plain percentages on the log axis (as fflab.plots.time_to_accuracy draws them)
            every = [e for line in ax.get_lines() for e in line.get_ydata()]
            lo, hi = min(every, default=1.0), max(every, default=10.0)
            ax.yaxis.set_major_locator(
                FixedLocator([t for t in ERROR_TICKS if lo / 1.15 <= t <= hi * 1.15])
            )
            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.grid(True, which="both", alpha=0.3)
            if group == "supervised":
                ax.legend(fontsize=8)
            else:  # many lines: the legend beside the panel
                ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        _save_png(plt, fig, out_dir / fname, dpi=100)
        written.append(fname)
    return written


def _best(members: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    return min(members.items(), key=lambda kv: kv[1]["test_error"])


def _versus(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How far apart two errors are, in standard errors of their difference."""
    se = (
        standard_error(a["test_error"], a["n_test"]) ** 2
        + standard_error(b["test_error"], b["n_test"]) ** 2
    ) ** 0.5
    d = a["test_error"] - b["test_error"]
    verdict = "resolved" if abs(d) > 2 * se else "not resolved by one seed"
    return f"{d:+.2f} points, {abs(d) / max(se, 1e-9):.1f} standard errors: {verdict}"


def write_report(out_dir: Path, results: dict[str, Any], quick: bool) -> Path:
    runs = results["runs"]
    lines = [
        "# Which negatives" + (" (quick)" if quick else ""),
        "",
        "Test error at the end (supervised: goodness scoring; unsupervised: the linear probe on "
        "the frozen features), the error after the first epoch, training seconds per epoch "
        "relative to the group's reference (random labels; hybrids with 6 blurs; same run, "
        "same machine, one run after another, so only the ratio means anything), the cost of "
        "one draw of the source against one training step (both measured interleaved in one "
        "process on a batch of test images; the step includes its own source's draw), and the "
        "last epoch's mean goodness of positive and negative rows in the last layer.",
        "",
        "| net | negatives | test error | after epoch 1 | time per epoch | one draw / one step "
        "| G+ / G- (last layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    costs = results.get("draw_costs", {}).get("draw_over_step", {})
    for name, r in runs.items():
        se = standard_error(r["test_error"], r["n_test"])
        first = f"{r['curve']['error'][0]:.2f}%" if r["curve"]["error"] else "-"
        ratio = f"{r['time_ratio']:.2f}x" if "time_ratio" in r else "-"
        cost = f"{100 * costs[name]:.1f}%" if name in costs else "-"
        lines.append(
            f"| {name} | {_label(r)} | {r['test_error']:.2f}% (± {se:.2f}) | {first} | {ratio} "
            f"| {cost} | {r['goodness_pos'][-1]:.0f} / {r['goodness_neg'][-1]:.0f} |"
        )
    lines += ["", "## Answer", ""]
    sup = {k: r for k, r in runs.items() if r["group"] == "supervised"}
    if {"supervised-random", "supervised-hard"} <= set(sup):
        rnd, hard = sup["supervised-random"], sup["supervised-hard"]
        c = hard["curve"]
        reach = next(
            (
                (e, t)
                for e, t, err in zip(c["epoch"], c["seconds"], c["error"], strict=True)
                if err <= rnd["test_error"]
            ),
            None,
        )
        lines.append(
            f"- Supervised: hard wrong labels {hard['test_error']:.2f}%, random ones "
            f"{rnd['test_error']:.2f}% (hard minus random: {_versus(hard, rnd)})"
            + (
                f"; hard labels reach random labels' final error at epoch {reach[0]} of "
                f"{rnd['curve']['epoch'][-1]} ({reach[1]:.0f} s of training against "
                f"{rnd['curve']['seconds'][-1]:.0f} s)."
                if reach and rnd["curve"]["epoch"]
                else "."
            )
        )
    unsup = {k: r for k, r in runs.items() if r["group"] == "unsupervised"}
    hybrids = {k: r for k, r in unsup.items() if r["negatives"] == "hybrid"}
    if hybrids:
        name, best = _best(hybrids)
        worst_name, worst = max(hybrids.items(), key=lambda kv: kv[1]["test_error"])
        lines.append(
            f"- Unsupervised, hybrid masks: the best is {_label(best)} at "
            f"{best['test_error']:.2f}%, the worst {_label(worst)} at "
            f"{worst['test_error']:.2f}% (worst minus best: {_versus(worst, best)}); by blurs, "
            + ", ".join(f"{r['blurs']}: {r['test_error']:.2f}%" for r in hybrids.values())
            + "."
        )
        for source in OTHER_UNSUPERVISED:
            r = unsup.get(f"unsupervised-{source}")
            if r is None:
                continue
            gp, gn = r["goodness_pos"][-1], r["goodness_neg"][-1]
            lines.append(
                f"- Unsupervised, {source}: {r['test_error']:.2f}% (minus the best hybrid: "
                f"{_versus(r, best)}); last layer G+ {gp:.0f} against G- {gn:.0f}"
                + f" (theta {r['theta']:g})"
                + "."
            )
    if "untrained" in results:
        u = results["untrained"]
        others = [
            f"{src} {runs[f'unsupervised-{src}']['test_error'] - u['test_error']:+.2f}"
            for src in OTHER_UNSUPERVISED
            if f"unsupervised-{src}" in runs
        ]
        lines.append(
            f"- Reference: the same probe on the untrained net (initial weights, random "
            f"features) gives {u['test_error']:.2f}%"
            + (f" (trained with {', '.join(others)} points from it)." if others else ".")
        )
    fig = results.get("figures") or []
    for f in fig:
        lines += ["", f"![{f}]({f})"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
