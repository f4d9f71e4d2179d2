"""Where an FF training step's time goes: products alone vs the whole step, plus a profile.

    python benchmarks/profile_ff_step.py [--data-dir DIR] [--hidden 1000,1000,1000] [--batch 100]

Times the step (fractions of the 2048 x 2048 matmul rate, FLOPs counted as in bench_ff.py)
and, for comparison, only the matrix products such a step needs (same shapes, random data) and
the same step on a net 8 units wide (its time is the step's fixed cost of issuing operations),
three rounds each; then prints torch.profiler's table of 50 steps by self time.
"""

from __future__ import annotations

import argparse

import torch
from bench_ff import C, D, flops, matmul_rate, timed
from torch.profiler import ProfilerActivity, profile

from fflab._runtime import tune_allocator
from fflab.data import load_mnist
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, FFTrainer


def products_only(hidden: tuple[int, ...], b: int):
    """The step's products: first-layer image product and its weight gradient, and per deeper
    layer a neutral (B rows) and a positive+negative (2B rows) pass and one 2B-row gradient."""
    dx = D - C  # overlay: the label replaces C pixels
    w0, inc0 = torch.randn(hidden[0], dx), torch.zeros(hidden[0], dx)
    x, d0 = torch.randn(b, dx), torch.randn(b, hidden[0])
    deep = [
        (
            torch.randn(o, i),
            torch.zeros(o, i),
            torch.randn(b, i),
            torch.randn(2 * b, i),
            torch.randn(2 * b, o),
        )
        for i, o in zip(hidden[:-1], hidden[1:], strict=True)
    ]

    def run():
        x @ w0.T
        inc0.addmm_(d0.T, x, beta=0.9, alpha=0.1)
        for w, inc, h1, h2, dz in deep:
            h1 @ w.T
            h2 @ w.T
            inc.addmm_(dz.T, h2, beta=0.9, alpha=0.1)

    return run


def make_step(hidden: tuple[int, ...], b: int, x: torch.Tensor, y: torch.Tensor):
    """A closure that runs one FF training step on the next batch of (x, y)."""
    net = FFNet(
        FFNetConfig(hidden=hidden, label_mode="overlay"), generator=torch.Generator().manual_seed(0)
    )
    trainer, gen, state = FFTrainer(net, FFTrainConfig()), torch.Generator().manual_seed(0), [0]

    def step():
        i = state[0] = (state[0] + 1) % (x.shape[0] // b)
        trainer.step(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b], gen)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hidden", default="1000,1000,1000")
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args()
    tune_allocator()
    hidden, b = tuple(int(h) for h in args.hidden.split(",")), args.batch
    ds = load_mnist(args.data_dir)
    x, y = ds.train.x[:20000], ds.train.y[:20000]
    step = make_step(hidden, b, x, y)
    # the same step with 8 units per layer: almost no arithmetic, so its time is the fixed
    # cost of issuing the step's operations (Python, dispatch, tiny kernels)
    fixed = make_step(tuple(8 for _ in hidden), b, x, y)
    work = flops(hidden)["ff_train"] * b
    gemms = products_only(hidden, b)
    cpu = torch.device("cpu")
    for _ in range(3):
        rate = matmul_rate(cpu)
        t_step, t_mm, t_fixed = (timed(f, cpu, 2.0) for f in (step, gemms, fixed))
        print(
            f"matmul {rate:.0f} GFLOP/s  step {1e3 * t_step:.2f} ms "
            f"({100 * work / t_step / 1e9 / rate:.0f}%)  products only {1e3 * t_mm:.2f} ms "
            f"({100 * work / t_mm / 1e9 / rate:.0f}%)  width-8 step {1e3 * t_fixed:.2f} ms",
            flush=True,
        )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
