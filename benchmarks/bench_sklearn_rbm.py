"""fflab.sklearn.RBM in place of scikit-learn's BernoulliRBM: scores and fit times.

    python benchmarks/bench_sklearn_rbm.py [--data-dir DIR] [--repeats 3] [--threads 1]
                                           [--mnist-iter 10] [--no-mnist]

1. scikit-learn's example "Restricted Boltzmann Machine features for digit classification",
   with each RBM: the 8x8 digits as float32, nudged (the original images and their copies
   shifted by one pixel up, left, right and down, zero fill: 8985 rows), scaled to [0, 1]
   by ``minmax_scale``, split 80/20 (``random_state=0``); Pipeline(RBM(learning_rate=0.06,
   n_iter=10, n_components=100, random_state=0), LogisticRegression(solver="newton-cg",
   C=6000)), and the raw-pixel logistic regression (C=100) beside it. (The example sets
   tol=1, with which scikit-learn 1.9's newton-cg stops before its first step; the default
   tolerance is used here, for every pipeline alike.) Reported: test accuracy and macro F1
   of each pipeline, and the RBM's fit time.
2. MNIST-sized data: the 60,000 MNIST training images (float32 in [0, 1], fflab's loader)
   with the same settings and n_components=256: the RBM's fit time, and the mean
   pseudo-log-likelihood of the 10,000 test images as a check that both learned alike.

Both RBMs get the same arrays and settings (batch_size 10, PCD-1, no momentum). The two are
timed in interleaved repeats (which one goes first alternates), so drift of a shared
machine's speed hits both; each figure is the median over repeats and each speed-up is
taken within a repeat (median over repeats). BLAS and torch are limited to ``--threads``.
Writes benchmarks/results/sklearn_rbm-<UTC time>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import BernoulliRBM
from sklearn.preprocessing import minmax_scale
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ff import machine_info, write_result  # noqa: E402

from fflab.data import load_mnist  # noqa: E402
from fflab.sklearn import RBM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE = {"learning_rate": 0.06, "n_iter": 10, "n_components": 100, "random_state": 0}
MAKERS = {"sklearn": BernoulliRBM, "fflab": RBM}


def shifted(images: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """Rows of 8x8 images (N, 64) moved so that pixel (i, j) shows (i + dr, j + dc); zeros
    where that falls outside."""
    img = images.reshape(-1, 8, 8)
    out = np.zeros_like(img)
    src_r, dst_r = slice(max(dr, 0), 8 + min(dr, 0)), slice(max(-dr, 0), 8 + min(-dr, 0))
    src_c, dst_c = slice(max(dc, 0), 8 + min(dc, 0)), slice(max(-dc, 0), 8 + min(-dc, 0))
    out[:, dst_r, dst_c] = img[:, src_r, src_c]
    return out.reshape(len(images), -1)


def nudged_digits():
    """The example's data: (X_train, X_test, y_train, y_test), X float32 in [0, 1]."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    moves = [(1, 0), (0, 1), (0, -1), (-1, 0)]  # up, left, right, down
    X = np.concatenate([X] + [shifted(X, dr, dc) for dr, dc in moves])
    y = np.concatenate([y] * 5)
    X = minmax_scale(X, feature_range=(0, 1))
    return train_test_split(X, y, test_size=0.2, random_state=0)


def logistic(C: float) -> LogisticRegression:
    """The example's classifier, newton-cg, at newton-cg's default tolerance: the example's
    tol=1 makes scikit-learn 1.9's newton-cg stop before its first step (chance accuracy)."""
    return LogisticRegression(solver="newton-cg", C=C, max_iter=1000)


def timed_fit(name: str, X: np.ndarray, **settings):
    """The fitted RBM, its wall-clock and its process CPU seconds."""
    rbm = MAKERS[name](**settings)
    wall, cpu = time.perf_counter(), time.process_time()
    rbm.fit(X)
    return rbm, time.perf_counter() - wall, time.process_time() - cpu


def warm_up(X: np.ndarray, **settings) -> None:
    """One short fit of each RBM first, so that one-time library start-up is not timed."""
    for name in MAKERS:
        MAKERS[name](**{**settings, "n_iter": 1}).fit(X[:500])


def scores(y_true, y_pred) -> dict:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
    }


def interleaved(repeats: int, run_one) -> dict:
    """``run_one(name) -> dict with "fit_seconds"`` for both RBMs, alternating which first."""
    rounds = []
    for r in range(repeats):
        names = ["sklearn", "fflab"] if r % 2 == 0 else ["fflab", "sklearn"]
        rounds.append({name: run_one(name) for name in names})
        fit = {name: round(rounds[-1][name]["fit_seconds"], 3) for name in names}
        print(f"  repeat {r + 1}/{repeats}: fit seconds {fit}", flush=True)
    out = {}
    for name in MAKERS:
        values = {k: [rd[name][k] for rd in rounds] for k in rounds[0][name]}
        out[name] = {k: statistics.median(v) for k, v in values.items()}
        out[name]["fit_seconds_all"] = values["fit_seconds"]
    for key, label in (("fit_seconds", "speedup"), ("fit_cpu_seconds", "cpu_speedup")):
        ratios = [rd["sklearn"][key] / rd["fflab"][key] for rd in rounds]
        out[label], out[f"{label}_all"] = statistics.median(ratios), ratios
    return out


def bench_digits(repeats: int) -> dict:
    X_tr, X_te, y_tr, y_te = nudged_digits()
    print(f"digits example: {X_tr.shape[0]} train rows, {X_tr.shape[1]} features, {X_tr.dtype}")

    def run_one(name):
        rbm, wall, cpu = timed_fit(name, X_tr, **EXAMPLE)
        clf = logistic(6000).fit(rbm.transform(X_tr), y_tr)
        pred = clf.predict(rbm.transform(X_te))
        return {"fit_seconds": wall, "fit_cpu_seconds": cpu, **scores(y_te, pred)}

    warm_up(X_tr, **EXAMPLE)
    out = interleaved(repeats, run_one)
    raw = logistic(100).fit(X_tr, y_tr)
    out["raw_pixels"] = scores(y_te, raw.predict(X_te))
    out["settings"] = {**EXAMPLE, "batch_size": 10, "logistic_C": 6000, "raw_pixel_C": 100}
    out["rows"] = {"train": int(X_tr.shape[0]), "test": int(X_te.shape[0])}
    return out


def bench_mnist(data_dir, repeats: int, n_iter: int, n_components: int) -> dict:
    ds = load_mnist(data_dir, allow_download=False)
    X_tr, X_te = ds.train.x.numpy(), ds.test.x.numpy()  # float32 in [0, 1]
    settings = {**EXAMPLE, "n_iter": n_iter, "n_components": n_components}
    print(f"MNIST: {X_tr.shape[0]} train rows, {X_tr.shape[1]} features, {settings}")

    def run_one(name):
        rbm, wall, cpu = timed_fit(name, X_tr, **settings)
        pll = float(rbm.score_samples(X_te).mean())
        return {"fit_seconds": wall, "fit_cpu_seconds": cpu, "test_pseudo_log_likelihood": pll}

    warm_up(X_tr, **settings)
    out = interleaved(repeats, run_one)
    out["settings"] = {**settings, "batch_size": 10}
    out["rows"] = {"train": int(X_tr.shape[0]), "test": int(X_te.shape[0])}
    return out


def speedups(part: dict) -> str:
    def each(key):
        return ", ".join(f"{x:.2f}" for x in part[f"{key}_all"])

    return (
        f"Fit speed-up of fflab over BernoulliRBM (median of per-repeat ratios): wall "
        f"{part['speedup']:.2f}x ({each('speedup')}), CPU {part['cpu_speedup']:.2f}x "
        f"({each('cpu_speedup')})."
    )


def markdown(info: dict) -> str:
    d = info["digits"]
    lines = [
        "# fflab.sklearn.RBM vs sklearn.neural_network.BernoulliRBM",
        "",
        f"Command: `{info['command']}`  ",
        f"Date: {info['date']}; {info['processor']}, {info['cpu_count']} CPUs, "
        f"{info['threads']} thread(s); torch {info['torch']}, scikit-learn "
        f"{info['sklearn']}, numpy {info['numpy']}.",
        "",
        f"## scikit-learn's digits example ({d['rows']['train']} training rows, "
        f"median of {info['repeats']} repeats)",
        "",
        "| RBM | test accuracy | macro F1 | RBM fit, wall (s) | RBM fit, CPU (s) |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("sklearn", "BernoulliRBM"), ("fflab", "fflab.sklearn.RBM")):
        r = d[name]
        lines.append(
            f"| {label} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['fit_seconds']:.2f} "
            f"| {r['fit_cpu_seconds']:.2f} |"
        )
    raw = d["raw_pixels"]
    lines += [
        f"| (raw pixels, no RBM) | {raw['accuracy']:.4f} | {raw['macro_f1']:.4f} | | |",
        "",
        speedups(d),
    ]
    if "mnist" in info:
        m = info["mnist"]
        s = m["settings"]
        lines += [
            "",
            f"## MNIST-sized data ({m['rows']['train']} x 784, n_components "
            f"{s['n_components']}, n_iter {s['n_iter']}, batch 10, lr {s['learning_rate']})",
            "",
            "| RBM | fit, wall (s) | fit, CPU (s) | test pseudo-log-likelihood |",
            "|---|---|---|---|",
        ]
        for name, label in (("sklearn", "BernoulliRBM"), ("fflab", "fflab.sklearn.RBM")):
            r = m[name]
            lines.append(
                f"| {label} | {r['fit_seconds']:.1f} | {r['fit_cpu_seconds']:.1f} "
                f"| {r['test_pseudo_log_likelihood']:.2f} |"
            )
        lines += ["", speedups(m)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="directory of the MNIST IDX .gz files")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="BLAS and torch threads")
    p.add_argument("--mnist-iter", type=int, default=10)
    p.add_argument("--mnist-components", type=int, default=256)
    p.add_argument("--no-mnist", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        info = machine_info(torch.device("cpu"))
        info.update(
            threads=args.threads,
            repeats=args.repeats,
            sklearn=sklearn.__version__,
            numpy=np.__version__,
            scipy=scipy.__version__,
            blas=[
                {k: lib.get(k) for k in ("internal_api", "num_threads", "version")}
                for lib in threadpool_info()
            ],
        )
        info["digits"] = bench_digits(args.repeats)
        if not args.no_mnist:
            info["mnist"] = bench_mnist(
                args.data_dir, args.repeats, args.mnist_iter, args.mnist_components
            )
    path = write_result(args.out, "sklearn_rbm", info)
    md = path.with_suffix(".md")
    md.write_text(markdown(info))
    print(f"wrote {md}")
    print(markdown(info))


if __name__ == "__main__":
    main()
