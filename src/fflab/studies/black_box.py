"""Black boxes between the layers: does FF learn through modules that have no derivative,
where backprop needs a surrogate?

The paper's claim: since FF never sends a gradient across a layer, the layers can be joined
by a black box (a non-differentiable, even unknown, map) and still learn; backprop cannot
without a model of the box's derivative. The study puts the same box in every gap between
hidden layers of an FF net and of its backprop twin (same widths, epochs, initialization and
box) and trains both on MNIST:

- FF: the boxed net, unchanged, with the fast FF step (the box's output enters the layer
  above as a constant; the tests hold that step equal to the autograd reference);
- BP + surrogate: the twin with the straight-through estimator (the box's Jacobian taken as
  the identity), or the exact transpose for the signed permutation
  (:mod:`fflab.studies.black_box_nets`);
- BP, plain autograd: the twin with no surrogate, to show what autograd alone does (the
  gradient stops at every box but the permutation, so the layers below it never learn).

Boxes (:mod:`fflab.ff.boxes`): a 4-bit quantizer on [0, 4]; a fixed random signed
permutation; ``np.tanh`` computed in numpy; 256-level lookup tables, a random monotone one and
a random non-monotone one. Each net is trained in its own directory (``result.json``); a
second run reuses finished nets (an interrupted net starts again).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fflab.checkpoint import atomic_write_text
from fflab.config import RunConfig, merge
from fflab.ff.model import FFNet
from fflab.studies import StudyContext, standard_error
from fflab.studies.black_box_nets import (
    BOX_KINDS,
    BoxedBPNet,
    make_boxes,
    surrogate,
    train_bp,
    train_ff,
)

DESCRIPTION = (
    "non-differentiable boxes between the layers (4-bit quantizer, signed permutation, numpy "
    "function, lookup tables): FF trained through them against backprop with a "
    "straight-through estimator, test error per box"
)
FF_PRESET, BP_PRESET = "mnist-ff-quick", "mnist-bp-hinton-code"
BOX_TEXT = {
    "none": "no box (the plain net)",
    "quantize4": "4-bit uniform quantizer, 16 levels on [0, 4], clipped outside",
    "permutation": "fixed random permutation of the units with random sign flips",
    "numpy-tanh": "np.tanh computed in numpy (tensor to numpy and back)",
    "lut-monotone": "256 levels on [0, 4], then a random increasing table of values in [0, 1)",
    "lut-random": "256 levels on [0, 4], then a random unordered table of values in [0, 1)",
}
METHODS = ("ff", "bp-surrogate", "bp-autograd")


def _configs(ctx: StudyContext) -> tuple[RunConfig, RunConfig]:
    """The FF and the backprop run configs: quick 2 x 500 for 4 epochs, full 3 x 1000 for 30.

    ``ctx.settings`` sections ``data``, ``model`` and ``train`` apply to both; ``ff.model``,
    ``ff.train``, ``bp.model`` and ``bp.train`` to one of them.
    """
    from fflab.api import _array_settings, _datasets
    from fflab.presets import resolve

    base = {
        "model": {"hidden": [500, 500] if ctx.quick else [1000, 1000, 1000]},
        "train": {"epochs": 4 if ctx.quick else 30},
    }
    shared = {k: v for k, v in ctx.settings.items() if k in ("data", "model", "train")}
    unknown = set(ctx.settings) - {"data", "model", "train", "ff.model", "ff.train", "bp.model",
                                   "bp.train"}  # fmt: skip
    if unknown:
        raise ValueError(f"black-box settings: unknown sections {', '.join(sorted(unknown))}")
    out = []
    for tag, preset in (("ff", FF_PRESET), ("bp", BP_PRESET)):
        own = {k[3:]: v for k, v in ctx.settings.items() if k.startswith(f"{tag}.")}
        settings = merge(merge(base, shared), own)
        if ctx.data is not None:
            settings = _array_settings(preset, _datasets(ctx.data), settings)
        out.append(resolve(preset, settings, ctx.seed))
    ff, bp = out
    if tuple(ff.model.hidden) != tuple(bp.model.hidden) or ff.train.epochs != bp.train.epochs:
        raise ValueError("black-box: FF and backprop must have the same widths and epochs")
    return ff, bp


def _data(config: RunConfig, ctx: StudyContext):
    from fflab import runs
    from fflab.api import _datasets

    given = None if ctx.data is None else _datasets(ctx.data)
    return runs.prepare_data(config, ctx.data_dir, torch.device("cpu"), given)


def _box_inputs(acts: list[torch.Tensor]) -> dict[str, float]:
    """Of the activities entering the boxes (layers 0..L-2), the fractions at 0 and above 4
    (the top of the quantizer's and the tables' range, where they clip)."""
    a = torch.cat([t.flatten() for t in acts[:-1]])
    return {"zero": float((a == 0).double().mean()), "above_4": float((a > 4).double().mean())}


def _train_one(
    method: str, kind: str, ff_cfg: RunConfig, bp_cfg: RunConfig, data, ctx: StudyContext
) -> dict[str, Any]:
    hidden = ff_cfg.model.hidden
    boxes = make_boxes(kind, hidden, torch.Generator().manual_seed(ctx.seed + 1))
    init = torch.Generator().manual_seed(ctx.seed)
    bs = ff_cfg.data.eval_batch_size
    test_x = data.test.x[:2000]
    start = time.perf_counter()
    if method == "ff":
        net = FFNet(ff_cfg.model, init, boxes)
        out = train_ff(net, ff_cfg.train, data, ctx.seed, bs, ctx.log)
        with torch.no_grad():
            out["box_inputs"] = _box_inputs(net.neutral_activities(test_x))
    else:
        grad = "surrogate" if method == "bp-surrogate" else "autograd"
        net = BoxedBPNet(bp_cfg.model, init, boxes, gradient=grad)
        out = train_bp(net, bp_cfg.train, data, ctx.seed, bs, ctx.log)
        with torch.no_grad():
            out["box_inputs"] = _box_inputs(net.activities(test_x))
        out["gradient"] = surrogate(boxes[0]) if grad == "surrogate" else "autograd as is"
    out["seconds"] = time.perf_counter() - start
    return out


def run(ctx: StudyContext) -> dict[str, Any]:
    ff_cfg, bp_cfg = _configs(ctx)
    data = _data(ff_cfg, ctx)
    configs = json.loads(json.dumps({"ff": ff_cfg.to_dict(), "bp": bp_cfg.to_dict()}))
    results: dict[str, Any] = {
        "dataset": ff_cfg.data.dataset,
        "hidden": list(ff_cfg.model.hidden),
        "epochs": ff_cfg.train.epochs,
        "n_train": len(data.train),
        "n_test": len(data.test),
        "configs": configs,
        "boxes": {},
    }
    for kind in BOX_KINDS:
        entry: dict[str, Any] = {"text": BOX_TEXT[kind]}
        for method in METHODS:
            if method == "bp-autograd" and kind in ("none", "permutation"):
                entry[method] = {"same_as": "bp-surrogate"}  # exact gradients: the same net
                continue
            run_dir = ctx.out_dir / f"{method}-{kind}"
            path = run_dir / "result.json"
            wanted = configs["ff" if method == "ff" else "bp"]
            if path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("config") != wanted:
                    raise ValueError(
                        f"{run_dir} holds a net trained with other settings; use another --out"
                    )
                ctx.log(f"{method}-{kind}: reusing the finished net in {run_dir}")
                out = saved["result"]
            else:
                ctx.log(f"{method}-{kind}: training")
                out = _train_one(method, kind, ff_cfg, bp_cfg, data, ctx)
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({"config": wanted, "result": out}, indent=2))
            entry[method] = out
        results["boxes"][kind] = entry
    write_report(ctx.out_dir, results, ctx.quick)
    return results


def error_of(results: dict[str, Any], kind: str, method: str) -> float:
    """Test error (percent) of ``method`` with box ``kind``: FF by goodness scoring."""
    r = results["boxes"][kind][method]
    if "same_as" in r:
        r = results["boxes"][kind][r["same_as"]]
    return r["test_error_goodness"] if method == "ff" else r["test_error"]


def _figure(out_dir: Path, results: dict[str, Any]) -> str | None:
    try:
        from fflab.plots import _pyplot, _save_png

        plt = _pyplot()
    except RuntimeError:
        return None
    kinds = list(results["boxes"])
    labels = {"ff": "FF (goodness)", "bp-surrogate": "BP + STE / exact transpose",
              "bp-autograd": "BP, plain autograd (no surrogate)"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    width = 0.27
    for j, method in enumerate(METHODS):
        vals = [error_of(results, k, method) for k in kinds]
        xs = [i + (j - 1) * width for i in range(len(kinds))]
        same = ["same_as" in results["boxes"][k][method] for k in kinds]
        bars = ax.bar(xs, vals, width, label=labels[method])
        for b, s in zip(bars, same, strict=True):
            if s:  # the same net as the bar beside it (exact gradient, nothing to stand in)
                b.set_hatch("//")
                b.set_alpha(0.5)
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    h = "x".join(map(str, results["hidden"]))
    name = {"mnist": "MNIST ", "fashion-mnist": "Fashion-MNIST "}.get(results["dataset"], "")
    ax.set_title(f"{name}test error with a box in every gap ({h}, {results['epochs']} epochs; "
                 "hatched: the same net as its left neighbour)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(plt, fig, out_dir / "errors.png", dpi=100)
    return "errors.png"


def write_report(out_dir: Path, results: dict[str, Any], quick: bool) -> Path:
    boxes, n = results["boxes"], results["n_test"]
    h = " x ".join(map(str, results["hidden"]))
    lines = [
        "# Black boxes between the layers" + (" (quick)" if quick else ""),
        "",
        f"A box in every gap between the hidden layers of {h} nets, {results['epochs']} "
        f"epochs on {results['n_train']} training images, test error on {n} images. FF: "
        f"the {FF_PRESET} recipe trained by the fast FF step (the box's output a constant "
        "input of the layer above), goodness scoring "
        f"(softmax head in brackets). BP: the {BP_PRESET} twin (same widths, epochs and "
        "initialization, the same boxes) by autograd, with the straight-through estimator "
        "(identity Jacobian) as the box's gradient, except the permutation, which gets its "
        "exact transpose; and with plain autograd (no surrogate).",
        "",
        "| box | what it does | FF | BP + surrogate | surrogate | BP, plain autograd | "
        "box inputs at 0 / above 4 (FF) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, e in boxes.items():
        ff, bs = e["ff"], e["bp-surrogate"]
        auto = (
            "same (exact)"
            if "same_as" in e["bp-autograd"]
            else f"{error_of(results, kind, 'bp-autograd'):.2f}%"
        )
        bi = ff["box_inputs"]
        lines.append(
            f"| {kind} | {e['text']} | {ff['test_error_goodness']:.2f}% "
            f"({ff['test_error_softmax']:.2f}%) | {bs['test_error']:.2f}% | {bs['gradient']} | "
            f"{auto} | {100 * bi['zero']:.0f}% / {100 * bi['above_4']:.2f}% |"
        )
    ff0, bp0 = error_of(results, "none", "ff"), error_of(results, "none", "bp-surrogate")
    se = standard_error(max(ff0, bp0), n)
    lines += [
        "",
        f"One standard error of an error near {max(ff0, bp0):.1f}% on {n} images is about "
        f"{se:.2f} points (one seed): differences under two of them are not resolved.",
        "",
        "## Answer",
        "",
    ]
    for kind in boxes:
        if kind == "none":
            continue
        f, b = error_of(results, kind, "ff"), error_of(results, kind, "bp-surrogate")
        a = error_of(results, kind, "bp-autograd")
        line = (
            f"- {kind}: FF {f:.2f}% ({f - ff0:+.2f} points against no box), BP + "
            f"{boxes[kind]['bp-surrogate']['gradient']} {b:.2f}% ({b - bp0:+.2f})"
        )
        if "same_as" not in boxes[kind]["bp-autograd"]:
            line += f", BP without a surrogate {a:.2f}% ({a - bp0:+.2f})"
        lines.append(line + ".")
    for method, name in (("ff", "FF"), ("bp-surrogate", "BP + surrogate")):
        ref = error_of(results, "none", method)
        same = [k for k in boxes if k != "none" and error_of(results, k, method) < ref + 2 * se]
        worse = [k for k in boxes if k != "none" and k not in same]
        lines.append(
            f"- {name}: within two standard errors of its error without a box (or better) "
            f"with {', '.join(same) or 'no box'}; worse with {', '.join(worse) or 'none'}."
        )
    seconds = {m: sum(e[m].get("seconds", 0.0) for e in boxes.values()) for m in METHODS}
    lines += [
        "",
        f"Training and evaluation took {seconds['ff']:.0f} s for the FF nets and "
        f"{seconds['bp-surrogate'] + seconds['bp-autograd']:.0f} s for the backprop nets "
        "(wall time, this run).",
    ]
    fig = _figure(out_dir, results)
    if fig:
        lines += ["", f"![{fig}]({fig})"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
