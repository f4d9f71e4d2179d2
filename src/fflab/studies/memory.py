"""Memory of one training step against depth: is FF lighter than backprop?

The FF paper argues that FF needs no stored activities for a backward pass, so its memory
should not grow with depth as backprop's does. The claim holds only if an FF step keeps one
layer's activities alive at a time. fflab's default step (``train.step_schedule=
forward_first``) runs every layer's forward pass first and then every layer's gradients, so
it keeps all layers' activities (and their normalized copies, for 2B stacked positive and
negative rows) alive at once; ``step_schedule=layerwise`` computes each layer's gradients
right after its forward pass and frees them before the layer above, the same update bit for
bit (held equal in the tests).

For each depth, width and batch the study builds fresh nets of dense layers (MNIST-sized
input), warms each step up on two rows (so the optimizer state exists), then measures the
peak memory of one full-batch step above the memory held before it (parameters, optimizer
state and the batch are held before and are reported apart): supervised FF and unsupervised
FF (hybrid negatives), each under both schedules, and the backprop twin (hand-derived SGD
step of :mod:`fflab.backprop`, same widths). Next to each measurement is the hand count of
:mod:`fflab.studies.memory_probe`. The two FF schedules (and backprop) are timed against
each other in the same run, steps interleaved.

The supervised net's softmax head reads the last three hidden layers (``model.head_from =
L - 3``, as Hinton's code reads layers 2-4 of 4): a head that reads every layer above the
first (fflab's default ``head_from=1``) keeps ``B (L - 1) H`` features alive, which grows with
depth like backprop's stored activities; the report gives its count.

Settings (``ctx.settings["memory"]``, optional): ``depths``, ``widths``, ``batches`` (lists),
``timed_steps`` (the least rounds of the timing, 0: no timing), ``timed_seconds`` (more
rounds, up to 20, until every method has run this long), ``timed_batches`` (the batch sizes
timed), ``threads`` (torch's CPU threads during the study, default 1: the memory does not
depend on it, and on a shared machine two threads stall at OpenMP barriers, which scatters
the times by 2x; 0 leaves torch's setting).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from fflab.checkpoint import atomic_write_text
from fflab.studies import StudyContext
from fflab.studies.memory_probe import (
    bp_step_bytes,
    ff_step_bytes,
    peak_bytes,
    state_bytes,
)

DESCRIPTION = (
    "peak memory of one training step against depth, width and batch: FF (supervised and "
    "unsupervised, forward-first and layerwise schedules) against the backprop twin, measured "
    "(allocator events) and counted by hand, and what the layerwise schedule costs in speed"
)
METHODS = ("ff-sup", "ff-sup-layerwise", "ff-unsup", "ff-unsup-layerwise", "bp")
LABELS = {
    "ff-sup": "FF supervised, forward-first",
    "ff-sup-layerwise": "FF supervised, layerwise",
    "ff-unsup": "FF unsupervised, forward-first",
    "ff-unsup-layerwise": "FF unsupervised, layerwise",
    "bp": "backprop twin",
}
MIB = 2**20


def grid(ctx: StudyContext) -> dict[str, list[int]]:
    """Depths, widths and batches of the study (quick: width 1000 at batch 100 only), and the
    timing: at least ``timed_steps`` rounds (and up to 20, until every method has run for
    ``timed_seconds``) at the batches ``timed_batches``."""
    g: dict[str, Any] = {
        "depths": [2, 4, 8, 16, 32],
        "widths": [1000] if ctx.quick else [1000, 2000],
        "batches": [100] if ctx.quick else [100, 1000],
        "timed_steps": 3,
        "timed_seconds": 2.0,
        "timed_batches": [100],
        "threads": 1,
    }
    given = ctx.settings.get("memory", {})
    unknown = set(given) - set(g)
    if unknown:
        raise ValueError(f"unknown memory settings {sorted(unknown)}; known: {sorted(g)}")
    g.update(given)
    for key in ("depths", "widths", "batches"):
        if not g[key] or min(g[key]) < 1:
            raise ValueError(f"memory.{key} must be a non-empty list of sizes >= 1")
    if g["timed_steps"] < 0 or g["timed_seconds"] < 0 or g["threads"] < 0:
        raise ValueError("memory.timed_steps, timed_seconds and threads must be >= 0")
    return g


def _data(ctx: StudyContext, rows: int):
    """Training images (rows, D) and labels of the study's data, its (1, H, W) image shape
    and whether the label is written over the image (MNIST's blank border) or concatenated."""
    from fflab import data as fdata
    from fflab.api import _datasets

    ds = _datasets(ctx.data) if ctx.data is not None else fdata.load("mnist", ctx.data_dir)
    x, y = ds.train.x, ds.train.y
    reps = math.ceil(rows / x.shape[0])
    x, y = x.repeat(reps, 1)[:rows], y.repeat(reps)[:rows]
    shape = tuple(ds.image_shape)
    shape = shape if len(shape) == 3 else (1, *shape)
    return x.contiguous(), y.contiguous(), shape, ctx.data is None


class _Case:
    """One method's net and step at one depth, width and batch."""

    def __init__(self, method: str, depth: int, width: int, batch: int, data, seed: int):
        from fflab.backprop import BPNet, BPNetConfig, BPTrainConfig, make_optimizer, sgd_step_
        from fflab.ff.model import FFNet, FFNetConfig
        from fflab.ff.train import FFTrainConfig, FFTrainer

        x, y, shape, overlay = data
        self.x, self.y = x[:batch], y[:batch]
        init = torch.Generator().manual_seed(seed)  # weights drawn on the CPU, then moved
        self.gen = torch.Generator(device=x.device).manual_seed(seed)  # the steps' draws
        hidden, d = (width,) * depth, x.shape[1]
        self.method = method
        if method == "bp":
            label_input = "neutral" if overlay else "none"
            net = BPNet(BPNetConfig(d, 10, hidden, label_input), init).to(x.device)
            opt = make_optimizer(net, BPTrainConfig())
            self.net, self.optimizer = net, opt
            self._step = lambda xb, yb: sgd_step_(net, opt, xb, yb)
            self.counted = lambda: bp_step_bytes(batch, d, hidden, neutral_label=overlay)
            return
        sup = method.startswith("ff-sup")
        mode = ("overlay" if overlay else "concat") if sup else "none"
        mcfg = FFNetConfig(
            in_features=d,
            hidden=hidden,
            label_mode=mode,
            head_from=max(0, depth - 3),
            score_from=min(1, depth - 1),
            image_shape=() if sup else shape,
        )
        schedule = "layerwise" if method.endswith("layerwise") else "forward_first"
        tcfg = FFTrainConfig(negatives="hard" if sup else "hybrid", step_schedule=schedule)
        net = FFNet(mcfg, generator=init).to(x.device)
        trainer = FFTrainer(net, tcfg)
        self.net, self.optimizer = net, trainer.optimizer
        self._step = lambda xb, yb: trainer.step(xb, yb, self.gen)
        self.counted = lambda: ff_step_bytes(
            batch, d, hidden, schedule=schedule, label_mode=mode, head_from=mcfg.head_from
        )

    def warm_up(self) -> None:
        """One step on two rows: the optimizer state and the step's caches now exist."""
        self._step(self.x[:2], self.y[:2])

    def step(self) -> None:
        self._step(self.x, self.y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_point(
    methods, depth: int, width: int, batch: int, data, seed: int, timed: int, seconds=0.0
):
    """Every method's measured and counted step peak at one point of the grid, and with
    ``timed`` > 0 its seconds per step: the fastest of at least ``timed`` rounds (more, up to
    20, until every method has run ``seconds`` in all) in which the methods' steps are
    interleaved."""
    device = data[0].device
    cases, rows = {}, {}
    for m in methods:
        case = _Case(m, depth, width, batch, data, seed)
        case.warm_up()
        measured = peak_bytes(case.step, device)
        rows[m] = {
            "method": m,
            "depth": depth,
            "width": width,
            "batch": batch,
            "measured": measured,
            "counted": case.counted(),
            **state_bytes(case.net, case.optimizer),
        }
        if timed:
            cases[m] = case
    if timed:
        took: dict[str, list[float]] = {m: [] for m in cases}
        cpu: dict[str, list[float]] = {m: [] for m in cases}
        while len(took[methods[0]]) < timed or (
            len(took[methods[0]]) < 20 and min(sum(v) for v in took.values()) < seconds
        ):
            for m, case in cases.items():
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                case.step()
                _sync(device)
                took[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
        for m in cases:  # the fastest round: the least disturbed by other work on the machine
            rows[m]["seconds_per_step"] = min(took[m])
            rows[m]["cpu_seconds_per_step"] = min(cpu[m])
            rows[m]["timed_rounds"] = len(took[m])
    return list(rows.values())


def crossover(depths: list[int], ff: list[float], bp: list[float]) -> int | None:
    """The smallest depth from which FF's peak stays below backprop's (None: never)."""
    found = None
    for d, f, b in zip(depths, ff, bp, strict=True):
        if f < b:
            found = d if found is None else found
        else:
            found = None
    return found


def counted_crossover(width: int, batch: int, d: int, overlay: bool, method: str, max_depth=64):
    """The smallest depth L (1..max_depth) from which the hand count of ``method`` stays below
    backprop's, from the closed counts (None if not below by ``max_depth``)."""
    ds = list(range(1, max_depth + 1))
    return crossover(
        ds,
        [_count(method, L, width, batch, d, overlay) for L in ds],
        [_count("bp", L, width, batch, d, overlay) for L in ds],
    )


def _count(method: str, depth: int, width: int, batch: int, d: int, overlay: bool, hf=None):
    hidden = (width,) * depth
    if method == "bp":
        return bp_step_bytes(batch, d, hidden, neutral_label=overlay)
    sup = method.startswith("ff-sup")
    mode = ("overlay" if overlay else "concat") if sup else "none"
    schedule = "layerwise" if method.endswith("layerwise") else "forward_first"
    head_from = max(0, depth - 3) if hf is None else min(hf, depth - 1)
    return ff_step_bytes(batch, d, hidden, schedule=schedule, label_mode=mode, head_from=head_from)


def run(ctx: StudyContext) -> dict[str, Any]:
    g = grid(ctx)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = torch.get_num_threads()
    if device.type == "cpu" and g["threads"]:
        torch.set_num_threads(g["threads"])
    try:
        return _run(ctx, g, device)
    finally:
        torch.set_num_threads(before)


def _run(ctx: StudyContext, g: dict[str, Any], device: torch.device) -> dict[str, Any]:
    data = _data(ctx, max(g["batches"]))
    data = (data[0].to(device), data[1].to(device), data[2], data[3])
    d, overlay = data[0].shape[1], data[3]
    rows: list[dict[str, Any]] = []
    for batch in g["batches"]:
        for width in g["widths"]:
            for depth in g["depths"]:
                timed = g["timed_steps"] if batch in g["timed_batches"] else 0
                ctx.log(f"memory: depth {depth}, width {width}, batch {batch}")
                rows += measure_point(
                    METHODS, depth, width, batch, data, ctx.seed, timed, g["timed_seconds"]
                )
    results: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "measurement": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler CPU allocator events (profile_memory=True)",
        "in_features": d,
        "label": "overlay" if overlay else "concat",
        "grid": g,
        "rows": rows,
        "summary": summarize(rows, g, d, overlay),
        "counted_grid": counted_grid(d, overlay),
    }
    write_report(ctx.out_dir, results, ctx.quick)
    return results


FULL_GRID = {"depths": [2, 4, 8, 16, 32], "widths": [1000, 2000], "batches": [100, 1000]}


def counted_grid(d: int, overlay: bool) -> dict[str, Any]:
    """The hand counts over the full grid (every method, depth, width and batch; no step
    runs), each FF method's counted crossover depth against backprop and its ratio at the
    deepest depth."""
    deepest = max(FULL_GRID["depths"])
    rows, summary = [], {}
    for b in FULL_GRID["batches"]:
        for w in FULL_GRID["widths"]:
            for dep in FULL_GRID["depths"]:
                for m in METHODS:
                    rows.append({"method": m, "depth": dep, "width": w, "batch": b,
                                 "counted": _count(m, dep, w, b, d, overlay)})  # fmt: skip
            bp = _count("bp", deepest, w, b, d, overlay)
            summary[f"width{w}-batch{b}"] = {
                m: {
                    "crossover_depth_counted": counted_crossover(w, b, d, overlay, m),
                    f"ratio_to_bp_at_{deepest}": _count(m, deepest, w, b, d, overlay) / bp,
                }
                for m in METHODS[:-1]
            }
    return {"grid": FULL_GRID, "rows": rows, "summary": summary}


def _series(rows, method, width, batch, key="measured"):
    pts = sorted((r["depth"], r[key]) for r in rows if (r["method"], r["width"], r["batch"]) ==
                 (method, width, batch))  # fmt: skip
    return [p[0] for p in pts], [p[1] for p in pts]


def _speed(timed: list[dict], depths: list[int], key: str) -> dict[str, dict[str, float]]:
    """Per depth, each FF mode's layerwise time over its forward-first time, and backprop's
    over forward-first supervised FF (``key``: wall or CPU seconds per step)."""
    sec = {(r["method"], r["depth"]): r[key] for r in timed}
    out = {
        mode: {str(d): sec[(f"ff-{mode}-layerwise", d)] / sec[(f"ff-{mode}", d)] for d in depths}
        for mode in ("sup", "unsup")
    }
    out["bp_over_ff_sup"] = {str(d): sec[("bp", d)] / sec[("ff-sup", d)] for d in depths}
    return out


def summarize(rows, g, d: int, overlay: bool) -> dict[str, Any]:
    """Per width and batch: each FF method's crossover depth against backprop (measured on
    the grid, and from the hand counts at every depth), its ratio to backprop at the deepest
    depth, and the layerwise schedule's time per step over the forward-first one's."""
    out: dict[str, Any] = {}
    deepest = max(g["depths"])
    for batch in g["batches"]:
        for width in g["widths"]:
            key = f"width{width}-batch{batch}"
            depths, bp = _series(rows, "bp", width, batch)
            entry: dict[str, Any] = {}
            for m in METHODS[:-1]:
                _, ff = _series(rows, m, width, batch)
                entry[m] = {
                    "crossover_depth": crossover(depths, ff, bp),
                    "crossover_depth_counted": counted_crossover(width, batch, d, overlay, m),
                    f"ratio_to_bp_at_{deepest}": ff[-1] / bp[-1],
                }
            sup1 = _count("ff-sup-layerwise", deepest, width, batch, d, overlay, hf=1)
            entry["ff-sup-layerwise_head_from_1_counted_ratio"] = sup1 / bp[-1]
            timed = [r for r in rows if (r["width"], r["batch"]) == (width, batch)
                     and "seconds_per_step" in r]  # fmt: skip
            if timed:
                entry["speed"] = _speed(timed, depths, "seconds_per_step")
                entry["speed_cpu"] = _speed(timed, depths, "cpu_seconds_per_step")
            out[key] = entry
    counted_error = [r["measured"] / r["counted"] - 1 for r in rows]
    out["measured_over_counted"] = {"min": 1 + min(counted_error), "max": 1 + max(counted_error)}
    return out


# -- report --------------------------------------------------------------------------------------
def _figure(out_dir: Path, rows, g, name: str, measured: bool) -> str | None:
    """Peak step memory against depth, one panel per width and batch of ``g``: measured
    (solid) and counted (dashed), or counted alone."""
    try:
        from fflab.plots import _pyplot, _save_png

        plt = _pyplot()
    except RuntimeError:
        return None
    panels = [(w, b) for b in g["batches"] for w in g["widths"]]
    cols = min(len(panels), 2 if len(panels) == 4 else 3)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.4 * cols, 4.2 * nrows), squeeze=False)
    colors = dict(zip(METHODS, ("C0", "C1", "C2", "C3", "k"), strict=True))
    for k, (w, b) in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for m in METHODS:
            dep, cnt = _series(rows, m, w, b, "counted")
            if measured:
                _, meas = _series(rows, m, w, b)
                ax.plot(dep, [v / MIB for v in meas], "o-", color=colors[m], label=LABELS[m])
                ax.plot(dep, [v / MIB for v in cnt], "x--", color=colors[m], alpha=0.7)
            else:
                ax.plot(dep, [v / MIB for v in cnt], "x--", color=colors[m], label=LABELS[m])
        ax.set(xscale="log", yscale="log", xlabel="hidden layers", ylabel="peak step memory (MiB)")
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(g["depths"], [str(v) for v in g["depths"]])
        how = "solid measured, dashed counted" if measured else "counted"
        ax.set_title(f"width {w}, batch {b} ({how})", fontsize=9)
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save_png(plt, fig, out_dir / name, dpi=100)
    return name


def _mib(v: float) -> str:
    return f"{v / MIB:.2f}" if v < 10 * MIB else f"{v / MIB:.1f}"


def write_report(out_dir: Path, results: dict[str, Any], quick: bool) -> Path:
    g, rows, summ = results["grid"], results["rows"], results["summary"]
    deepest = max(g["depths"])
    lines = [
        "# Memory of one training step" + (" (quick)" if quick else ""),
        "",
        f"Device: {results['device']} ({results['threads']} thread(s)); measured with "
        f"{results['measurement']}. Peak bytes "
        "of one step above what was held before it (parameters, optimizer state, the batch), "
        "in MiB; *counted* is the hand count of fflab.studies.memory_probe (tensors with a "
        "row per sample only). Dense layers, input width "
        f"{results['in_features']} (label: {results['label']}); the supervised head reads the "
        "last three layers.",
        "",
        "| width | batch | depth | "
        + " | ".join(LABELS[m] for m in METHODS)
        + " | parameters + optimizer (FF sup / BP) |",
        "|---|---|---|" + "---|" * len(METHODS) + "---|",
    ]
    by = {(r["method"], r["width"], r["batch"], r["depth"]): r for r in rows}
    for b in g["batches"]:
        for w in g["widths"]:
            for dep in g["depths"]:
                cells = []
                for m in METHODS:
                    r = by[(m, w, b, dep)]
                    cells.append(f"{_mib(r['measured'])} ({_mib(r['counted'])})")
                fs, bp = by[("ff-sup", w, b, dep)], by[("bp", w, b, dep)]
                state = (f"{_mib(fs['parameters'] + fs['optimizer'])} / "
                         f"{_mib(bp['parameters'] + bp['optimizer'])}")  # fmt: skip
                lines.append(f"| {w} | {b} | {dep} | " + " | ".join(cells) + f" | {state} |")
    lines += [
        "",
        "Cells: measured (counted), MiB.",
        "",
        "## Answer",
        "",
        f"Where FF's step needs less than backprop's, and FF over backprop at {deepest} "
        "layers (measured; the counted crossover is the first depth of 1..64 from which the "
        "hand count stays below backprop's):",
        "",
        f"| width | batch | method | below backprop from | counted: from | FF / BP at {deepest} |",
        "|---|---|---|---|---|---|",
    ]
    for b in g["batches"]:
        for w in g["widths"]:
            e = summ[f"width{w}-batch{b}"]
            for m in METHODS[:-1]:
                st = e[m]
                cross = st["crossover_depth"]
                lines.append(
                    f"| {w} | {b} | {LABELS[m]} | "
                    + (f"{cross} layers" if cross else "no depth measured")
                    + f" | {st['crossover_depth_counted'] or 'none by 64'} | "
                    f"{st[f'ratio_to_bp_at_{deepest}']:.2f} |"
                )
    lines += [
        "",
        "A supervised layerwise step whose head reads every layer above the first "
        "(head_from=1) counts "
        + ", ".join(
            f"{summ[f'width{w}-batch{b}']['ff-sup-layerwise_head_from_1_counted_ratio']:.2f}x"
            f" (width {w}, batch {b})"
            for b in g["batches"]
            for w in g["widths"]
        )
        + f" backprop at {deepest} layers: its head's features grow with depth.",
    ]
    timed = [(w, b) for b in g["batches"] for w in g["widths"]
             if "speed" in summ[f"width{w}-batch{b}"]]  # fmt: skip
    if timed:
        lines += [
            "",
            "## Speed",
            "",
            "Time per step, layerwise over forward-first, and backprop over forward-first "
            "supervised FF, measured in this run: each method's fastest of at least "
            f"{g['timed_steps']} interleaved rounds (more, up to 20, until each has run "
            f"{g['timed_seconds']:g} s), in wall-clock and in process CPU seconds (the latter "
            "less disturbed by other work on the machine):",
            "",
            "| width | batch | depth | supervised | unsupervised | backprop / FF supervised |",
            "|---|---|---|---|---|---|",
        ]
        for w, b in timed:
            e = summ[f"width{w}-batch{b}"]
            sp, sc = e["speed"], e["speed_cpu"]
            for dep in sp["sup"]:
                lines.append(
                    f"| {w} | {b} | {dep} | "
                    + " | ".join(
                        f"{sp[k][dep]:.2f} (CPU {sc[k][dep]:.2f})"
                        for k in ("sup", "unsup", "bp_over_ff_sup")
                    )
                    + " |"
                )
    mc = summ["measured_over_counted"]
    lines += [
        "",
        f"Measured over counted: {mc['min']:.3f} to {mc['max']:.3f} over every point (the "
        "count leaves out per-row and per-unit vectors and allocator rounding).",
    ]
    fig = _figure(out_dir, rows, g, "memory.png", measured=True)
    if fig:
        lines += ["", f"![{fig}]({fig})"]
    cg = results["counted_grid"]
    cdeep = max(cg["grid"]["depths"])
    lines += [
        "",
        "## Counted over the whole grid",
        "",
        "The hand counts (within the measured-over-counted range above wherever measured) "
        "at every width and batch: the first depth from which FF's count stays below "
        f"backprop's, and FF over backprop at {cdeep} layers.",
        "",
        "| width | batch | "
        + " | ".join(LABELS[m] for m in METHODS[:-1])
        + f" | backprop at {cdeep} (MiB) |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    cby = {(r["method"], r["width"], r["batch"], r["depth"]): r for r in cg["rows"]}
    for b in cg["grid"]["batches"]:
        for w in cg["grid"]["widths"]:
            e = cg["summary"][f"width{w}-batch{b}"]
            cells = [
                f"from {e[m]['crossover_depth_counted'] or 'none'}, "
                f"{e[m][f'ratio_to_bp_at_{cdeep}']:.2f}x"
                for m in METHODS[:-1]
            ]
            bp = cby[("bp", w, b, cdeep)]["counted"]
            lines.append(f"| {w} | {b} | " + " | ".join(cells) + f" | {_mib(bp)} |")
    fig = _figure(out_dir, cg["rows"], cg["grid"], "memory_counted.png", measured=False)
    if fig:
        lines += ["", f"![{fig}]({fig})"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
