"""RBM training throughput (fflab CD-1 / PCD-1 vs scikit-learn's BernoulliRBM) and AIS time.

784 x 500 RBM, minibatch 100, lr 0.05, binarized MNIST (pixel > 0.5). The headline rows use
scikit-learn's own settings (no momentum, no weight decay; sklearn trains by PCD-1); fflab
with the practical guide's momentum and weight decay is timed beside them. Every method
trains on the same samples; the methods are run in interleaved rounds (the matmul rate of a
shared machine drifts within minutes): the median samples/s per method is reported, each speed-up
over scikit-learn is taken within a round (median over rounds), and the float32 GEMM rate
of the step's own shape is measured in every round. Then one AIS evaluation of log Z at
the default schedule (14,500 steps, 100 chains) of a briefly trained RBM is timed.

    python benchmarks/bench_rbm.py                 # full run, writes JSON
    python benchmarks/bench_rbm.py --samples 2000 --no-ais   # quick look

Writes benchmarks/results/rbm-<hostname>-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fflab._runtime import tune_allocator  # noqa: E402
from fflab.boltzmann import (  # noqa: E402
    RBM,
    ais_log_z,
    average_log_prob,
    make_base_rate_visible_bias,
    rbm_optimizer,
    rbm_train_epoch,
)
from fflab.data import load_mnist  # noqa: E402


def load_binarized_mnist(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) as float32 {0, 1} arrays of shape (N, 784), thresholded at 0.5."""
    ds = load_mnist(data_dir, allow_download=False)
    xtr, xte = ds.train.x.numpy(), ds.test.x.numpy()
    return (xtr > 0.5).astype(np.float32), (xte > 0.5).astype(np.float32)


def gemm_gflops(seconds: float = 0.5) -> float:
    """float32 rate of the training step's GEMM shape, (100, 784) x (784, 500)."""
    a, b = torch.rand(100, 784), torch.rand(784, 500)
    for _ in range(10):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 100 * 784 * 500 / (time.perf_counter() - t0) / 1e9


def time_fflab(
    data: np.ndarray,
    *,
    persistent: bool,
    model_dtype: torch.dtype,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> float:
    """samples/s of one epoch; the defaults are scikit-learn's settings (plain SGD)."""
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(data)
    rbm = RBM(784, 500, generator=g).to(model_dtype)
    opt = rbm_optimizer(rbm, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    kw = dict(batch_size=100, optimizer=opt, k=1, generator=g)
    rbm_train_epoch(rbm, x[:1000], persistent=persistent, **kw)  # burn-in
    t0 = time.perf_counter()
    rbm_train_epoch(rbm, x, persistent=persistent, **kw)
    return len(x) / (time.perf_counter() - t0)


def time_sklearn(data: np.ndarray) -> float:
    from sklearn.neural_network import BernoulliRBM

    kw = dict(n_components=500, batch_size=100, learning_rate=0.05, n_iter=1, random_state=0)
    BernoulliRBM(**kw).fit(data[:1000])  # burn-in
    t0 = time.perf_counter()
    BernoulliRBM(**kw).fit(data)
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    ap.add_argument("--samples", type=int, default=10000, help="training samples per timing")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per method")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and BLAS threads")
    ap.add_argument("--no-ais", action="store_true")
    ap.add_argument("--ais-chains", type=int, default=100)
    ap.add_argument("--ais-betas", type=int, default=14500)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()

    allocator_tuned = tune_allocator()
    torch.set_num_threads(args.threads)
    import sklearn
    from threadpoolctl import threadpool_limits

    # numpy's BLAS (what sklearn runs on) gets the same number of threads as torch
    threadpool_limits(args.threads)

    load_at_start = os.getloadavg()
    train, test = load_binarized_mnist(args.data_dir)
    x32 = np.ascontiguousarray(train[: args.samples])
    x64 = x32.astype(np.float64)

    f32, f64 = torch.float32, torch.float64
    guide = {"momentum": 0.5, "weight_decay": 2e-4}  # the practical guide's first epochs
    methods = {
        # scikit-learn's settings: lr 0.05, batch 100, no momentum, no weight decay
        "fflab PCD-1, float32": lambda: time_fflab(x32, persistent=True, model_dtype=f32),
        "fflab CD-1, float32": lambda: time_fflab(x32, persistent=False, model_dtype=f32),
        "fflab PCD-1, float64 data (float32 model)": lambda: time_fflab(
            x64, persistent=True, model_dtype=f32
        ),
        "fflab PCD-1, float64 model": lambda: time_fflab(x64, persistent=True, model_dtype=f64),
        "fflab PCD-1, float32, momentum + weight decay": lambda: time_fflab(
            x32, persistent=True, model_dtype=f32, **guide
        ),
        "fflab CD-1, float32, momentum + weight decay": lambda: time_fflab(
            x32, persistent=False, model_dtype=f32, **guide
        ),
        "sklearn BernoulliRBM (PCD-1), float32 data": lambda: time_sklearn(x32),
        "sklearn BernoulliRBM (PCD-1), float64 data": lambda: time_sklearn(x64),
    }
    rates: dict[str, list[float]] = {name: [] for name in methods}
    gflops = []
    for r in range(args.rounds):
        gflops.append(gemm_gflops())
        order = list(methods.items())
        for name, fn in order[::-1] if r % 2 else order:  # alternate, so no method is always first
            rates[name].append(fn())

    result = {
        "benchmark": "rbm",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_at_start": load_at_start,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
            "allocator_tuned": allocator_tuned,
        },
        "setup": {"n_visible": 784, "n_hidden": 500, "batch_size": 100, "samples": len(x32)},
        "gemm_gflops_float32": gflops,
        "samples_per_s": {n: {"median": statistics.median(r), "all": r} for n, r in rates.items()},
    }

    # Each ratio is taken within a round (minutes apart at most, so on the same machine
    # speed), and the median over the rounds is reported next to every round's value.
    def paired(ours: str, theirs: str) -> dict[str, object]:
        per_round = [a / b for a, b in zip(rates[ours], rates[theirs], strict=True)]
        return {"median": statistics.median(per_round), "rounds": per_round}

    sk32 = "sklearn BernoulliRBM (PCD-1), float32 data"
    sk64 = "sklearn BernoulliRBM (PCD-1), float64 data"
    # Same settings as scikit-learn (PCD-1 is what BernoulliRBM does; CD-1 beside it), then
    # fflab with the momentum and weight decay that sklearn lacks (more work per step).
    result["speedup_vs_sklearn_float32"] = {
        "PCD-1": paired("fflab PCD-1, float32", sk32),
        "CD-1": paired("fflab CD-1, float32", sk32),
        "PCD-1, momentum + weight decay": paired(
            "fflab PCD-1, float32, momentum + weight decay", sk32
        ),
        "CD-1, momentum + weight decay": paired(
            "fflab CD-1, float32, momentum + weight decay", sk32
        ),
    }
    result["speedup_vs_sklearn_float64"] = {
        "PCD-1 (float32 model)": paired("fflab PCD-1, float64 data (float32 model)", sk64),
        "PCD-1 (float64 model)": paired("fflab PCD-1, float64 model", sk64),
    }

    if not args.no_ais:
        # A briefly trained model (one CD-1 epoch on the timing samples) so that W is not
        # trivial; the time of AIS does not depend on how well the model is trained.
        g = torch.Generator().manual_seed(1)
        rbm = RBM(784, 500, generator=g)
        xt = torch.from_numpy(x32)
        rbm.init_visible_bias_from(xt)
        rbm_train_epoch(rbm, xt, batch_size=100, optimizer=rbm_optimizer(rbm), k=1, generator=g)
        base = make_base_rate_visible_bias(torch.from_numpy(train))
        t0 = time.perf_counter()
        est = ais_log_z(
            rbm,
            n_chains=args.ais_chains,
            n_betas=args.ais_betas,
            generator=g,
            base_visible_bias=base,
        )
        seconds = time.perf_counter() - t0
        result["ais"] = {
            "n_chains": args.ais_chains,
            "n_betas": args.ais_betas,
            "seconds": seconds,
            "log_z": est.log_z,
            "std_error": est.std_error,
            "test_avg_log_prob_after_one_cd1_epoch": average_log_prob(
                rbm, torch.from_numpy(test), est.log_z
            ),
        }

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"rbm-{socket.gethostname()}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"RBM 784x500, batch 100, {len(x32)} samples, {args.threads} threads; GEMM", end=" ")
    print(f"{statistics.median(gflops):.0f} GFLOP/s (median of {len(gflops)})")
    print(f"{'method':<48}{'samples/s':>12}")
    for name, r in rates.items():
        print(f"{name:<48}{statistics.median(r):>12,.0f}")
    for key in ("speedup_vs_sklearn_float32", "speedup_vs_sklearn_float64"):
        for name, r in result[key].items():
            rounds = ", ".join(f"{x:.2f}" for x in r["rounds"])
            print(f"{key} {name}: {r['median']:.2f}x (rounds: {rounds})")
    if "ais" in result:
        a = result["ais"]
        print(
            f"AIS {a['n_chains']} chains x {a['n_betas']} steps: {a['seconds']:.1f} s, "
            f"log Z = {a['log_z']:.2f} +- {a['std_error']:.2f}"
        )
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
