"""The FF training step of two code versions, timed in one run.

    python benchmarks/bench_versions.py [--base REV] [--rounds N] [--data-dir DIR] [--local]

``--base`` (default ``4116dba``, the last commit with the one hand-fused FF step) is exported
with ``git archive`` into a temporary folder; the other side is this working tree. For each
net (3 x 1000 and 4 x 2000 at batch 100, and 4 x 2000 at batch 1000) the two versions are
timed alternately, in N rounds (default 5) of one fresh process each, so that both see the
same drift of a shared machine: each process builds the net with Hinton's recipe (hard
negatives, peer normalization), warms up, times ``FFTrainer.step`` on MNIST batches (random
images without MNIST) for about a second, and measures the float32 matmul rate right before
and after. Reported per net: the median over rounds of the paired ratio ``head samples/s /
base samples/s`` (the two timings of a round are seconds apart) and each version's median
fraction of the matmul rate. ``--local`` times the unsupervised step of the
``mnist-ff-unsup-local`` net (locally connected layers, hybrid negatives, peer normalization,
batch 100) instead. Results go to benchmarks/results/versions-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from bench_ff import machine_info, write_result

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NETS = [((1000, 1000, 1000), 100), ((2000, 2000, 2000, 2000), 100), ((2000,) * 4, 1000)]
LOCAL = "mnist-ff-unsup-local"

# runs in a fresh interpreter with PYTHONPATH at one version's src/; uses only the API both
# versions share (FFNet, FFNetConfig, FFTrainConfig, FFTrainer.step, load_mnist, resolve);
# hidden "mnist-ff-unsup-local" times that preset's unsupervised step
WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from bench_ff import flops, matmul_rate, timed, unsup_step_flops
from fflab._runtime import tune_allocator
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, FFTrainer
tune_allocator()
hidden, batch, data_dir = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    from fflab.data import load_mnist
    ds = load_mnist(data_dir or None)
    x, y = ds.train.x[:20000], ds.train.y[:20000]
except Exception:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20000, 784, generator=g)
    x[:, :10] = 0
    y = torch.randint(0, 10, (20000,), generator=g)
if isinstance(hidden, str):
    from fflab.presets import resolve
    net = FFNet(resolve(hidden).model, generator=torch.Generator().manual_seed(0))
    tr = FFTrainer(net, FFTrainConfig(negatives="hybrid"))
    step_flops = unsup_step_flops(net)
else:
    cfg = FFNetConfig(hidden=tuple(hidden), label_mode="overlay")
    net = FFNet(cfg, generator=torch.Generator().manual_seed(0))
    tr = FFTrainer(net, FFTrainConfig())
    step_flops = flops(tuple(hidden))["ff_train"]
g, n, state = torch.Generator().manual_seed(0), x.shape[0] // batch, {"i": 0}
def step():
    i = state["i"] = (state["i"] + 1) % n
    tr.step(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch], g)
cpu = torch.device("cpu")
before = matmul_rate(cpu)
sec = timed(step, cpu, 1.0)
after = matmul_rate(cpu)
sps = batch / sec
frac = step_flops * sps / 1e9 / ((before + after) / 2)
print(json.dumps({"samples_per_second": sps, "fraction_of_matmul": frac,
                  "matmul_gflops": (before + after) / 2}))
"""


def export(rev: str, dest: Path) -> Path:
    """``git archive`` of ``rev``'s src/ into ``dest``; returns dest/src."""
    data = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "src"],
        check=True,
        capture_output=True,
    ).stdout
    tar = dest / "src.tar"
    tar.write_bytes(data)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest / "src"


def time_version(src: Path, hidden, batch: int, data_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    spec = json.dumps(hidden if isinstance(hidden, str) else list(hidden))
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(HERE), spec, str(batch), data_dir],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="4116dba")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data-dir", default="")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--local", action="store_true", help=f"time the {LOCAL} net's step")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    base_commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.base],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    head_commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    src_changed = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src"])
    if src_changed.returncode:  # the working tree's src/ differs from HEAD's
        head_commit += "+changes"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"base": export(args.base, Path(tmp)), "head": REPO / "src"}
        for hidden, batch in [(LOCAL, 100)] if args.local else NETS:
            rounds = []
            for r in range(args.rounds):
                order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
                rounds.append(
                    {v: time_version(versions[v], hidden, batch, args.data_dir) for v in order}
                )
            ratio = statistics.median(
                r["head"]["samples_per_second"] / r["base"]["samples_per_second"] for r in rounds
            )
            row = {
                "hidden": hidden if args.local else list(hidden),
                "batch": batch,
                "head_over_base": ratio,
            }
            for v in versions:
                row[v] = {
                    k: statistics.median(r[v][k] for r in rounds)
                    for k in ("samples_per_second", "fraction_of_matmul", "matmul_gflops")
                }
            row["rounds"] = rounds
            rows.append(row)
            print(
                f"{hidden if args.local else 'x'.join(map(str, hidden)):>19} b={batch:<5} "
                f"base {base_commit}: "
                f"{row['base']['samples_per_second']:6.0f}/s "
                f"{100 * row['base']['fraction_of_matmul']:3.0f}%   head {head_commit}: "
                f"{row['head']['samples_per_second']:6.0f}/s "
                f"{100 * row['head']['fraction_of_matmul']:3.0f}%   head/base {ratio:.3f}",
                flush=True,
            )
    info = {
        **machine_info(torch.device("cpu")),
        "base": base_commit,
        "head": head_commit,
        "results": rows,
    }
    write_result(args.out, "versions-cpu", info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
