"""Data-parallel scaling on this machine, and a model of N machines for the paper's net.

    python benchmarks/bench_distributed.py [--steps N] [--rounds R] [--skip-model]

Measured, one thread per process, global batch 100, on random MNIST-shaped data (784
features, 10 classes; the step's cost does not depend on the pixel values):

- the supervised FF step (mnist-ff-quick: 3 x 1000, hard negatives, peer normalization) and
  the backprop twin's step (mnist-bp-hinton-code: 3 x 1000, hand-derived SGD), each as one
  ordinary process, as one data-parallel process (``WORLD_SIZE=1``: the unfused step plus the
  reductions, which are then no-ops) and as two data-parallel processes (gloo, loopback);
  each rank is a subprocess with the environment torchrun gives its workers;
- the bytes each rank hands to collectives per step (gradient buffers, loss statistics, peer
  normalization means, gathered softmax probabilities), counted at the collective calls;
- the time of the gradient all-reduce alone on two processes (its payload, timed apart).

Scaling efficiency at N processes is ``t(1) / (N * t(N))`` against the ordinary process.

The model: a step on N machines takes ``compute(100 / N rows) + allreduce(N)``, with the
compute measured here for the paper's 4 x 2000 net (FF and backprop, one thread, local
batches 100, 50, 25, 13, 7) and a ring all-reduce of the S gradient bytes costing ``2 (N - 1)
/ N * S / bandwidth + 2 (N - 1) * latency``, for three links: the gloo loopback rate measured
here, 10 Gbit/s and 100 Gbit/s Ethernet (latency 50 us).

Results go to benchmarks/results/distributed_cpu-<UTC time>.json and .md; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_ff import machine_info, timed, write_result  # noqa: E402

BATCH, D, C = 100, 784, 10
CPU = torch.device("cpu")
PRESETS = {"ff": "mnist-ff-quick", "bp": "mnist-bp-hinton-code"}
PAPER = (2000, 2000, 2000, 2000)
LINKS = {"10 Gbit/s": 1.25e9, "100 Gbit/s": 12.5e9}
LATENCY = 50e-6


def random_data(n: int = 2000):
    from fflab.data import Datasets, Split

    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(n, D, generator=g), torch.randint(0, C, (n,), generator=g))
    return Datasets(split, Split(split.x[:100], split.y[:100]), None, (28, 28), C)


def build(alg: str, hidden, ds):
    """The run's experiment for ``alg`` ('ff' or 'bp') with the given widths."""
    from fflab import presets, runs

    settings = {"data": {"dataset": "arrays"}, "model": {"hidden": list(hidden)}}
    config = presets.resolve(PRESETS[alg], settings, seed=0)
    return runs.build_experiment(config, None, CPU, ds)


def stepper(alg: str, exp):
    """A function (x, y, generator) -> None doing one training step of ``exp``."""
    if alg == "ff":
        return lambda x, y, g: exp.trainer.step(x, y, g)
    return lambda x, y, g: exp.step(x, y)


def counting(comm):
    """``comm`` counting the bytes each collective call hands over (per rank)."""
    from fflab.distributed import Comm

    class Counting(Comm):
        sent = 0

        def all_reduce_(self, t, op=None):
            self.sent += t.numel() * t.element_size()
            return super().all_reduce_(t, op)

        def all_reduce_async(self, t):
            self.sent += t.numel() * t.element_size()
            return super().all_reduce_async(t)

        def gather_rows(self, local, n):
            m = math.ceil(n / self.world_size)
            self.sent += m * local[0].numel() * local.element_size()
            return super().gather_rows(local, n)

    return Counting(comm.rank, comm.world_size, comm.device, comm.timeout, comm.owns_group)


def worker(alg: str, steps: int, rounds: int) -> dict:
    """One rank (or the ordinary process when not launched): seconds per step, bytes."""
    torch.set_num_threads(1)
    from fflab import distributed

    ds = random_data()
    exp = build(alg, (1000, 1000, 1000), ds)
    comm = distributed.init(CPU, timeout=120)
    if comm is not None:
        comm = counting(comm)
        distributed.parallelize(alg, exp, comm)
    step = stepper(alg, exp)
    g = torch.Generator().manual_seed(1)
    x, y = ds.train.x, ds.train.y
    state = {"i": 0}

    def one():
        i = state["i"] % (x.shape[0] // BATCH)
        state["i"] += 1
        step(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH], g)

    times = []
    for _ in range(rounds):
        if comm is not None:
            comm.any(False)  # start the round together
        n0 = state["i"]
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        times.append((time.perf_counter() - t0) / (state["i"] - n0))
    out = {"seconds_per_step": statistics.median(times), "rounds": times}
    if comm is not None:
        sent0 = comm.sent
        one()
        out["bytes_per_step"] = comm.sent - sent0
        out["world_size"] = comm.world_size
        out["rank"] = comm.rank
        # the gradient all-reduce alone: the buffers' payload, timed apart
        buf = torch.zeros(sum(f.numel() for _, f in _buckets(alg, exp).buckets))
        comm.any(False)
        out["allreduce_seconds"] = timed(lambda: comm.all_reduce_(buf), CPU, 1.0)
        out["allreduce_bytes"] = buf.numel() * buf.element_size()
        comm.close()
    return out


def _buckets(alg, exp):
    return exp.trainer.buckets if alg == "ff" else exp._buckets


def launch(alg: str, world: int, steps: int, rounds: int) -> list[dict]:
    """``world`` ranks (0: one ordinary process) of this file's worker; each one's result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    port = 29500 + (os.getpid() % 1000)
    procs = []
    for rank in range(max(world, 1)):
        e = dict(env)
        if world:
            e.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        cmd = [sys.executable, str(HERE), "--worker", alg, "--steps", str(steps)]
        cmd += ["--rounds", str(rounds)]
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"bench_distributed: a {alg} worker failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def grad_bytes(hidden) -> int:
    """float32 bytes of an FF net's gradients (layers and softmax head), overlay input."""
    widths = (D, *hidden)
    n = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    return 4 * (n + sum(hidden[1:]) * C + C)


def model(steps: int, loopback: float) -> dict:
    """Predicted step time and efficiency on N machines for the paper's 4 x 2000 net."""
    torch.set_num_threads(1)
    ds = random_data(1000)
    compute = {}
    for alg in ("ff", "bp"):
        exp = build(alg, PAPER, ds)
        step = stepper(alg, exp)
        g = torch.Generator().manual_seed(1)
        for n in (1, 2, 4, 8, 16):
            b = math.ceil(BATCH / n)
            x, y = ds.train.x[:b], ds.train.y[:b]
            compute[(alg, n)] = timed(lambda x=x, y=y, s=step, g=g: s(x, y, g), CPU, 2.0)
    s = grad_bytes(PAPER)
    links = {"gloo loopback (measured)": loopback, **LINKS}
    rows = []
    for alg in ("ff", "bp"):
        t1 = compute[(alg, 1)]
        for n in (1, 2, 4, 8, 16):
            for link, bw in links.items():
                comm = 0.0 if n == 1 else 2 * (n - 1) / n * s / bw + 2 * (n - 1) * LATENCY
                t = compute[(alg, n)] + comm
                rows.append(
                    {
                        "algorithm": alg,
                        "machines": n,
                        "link": link,
                        "compute_seconds": compute[(alg, n)],
                        "allreduce_seconds": comm,
                        "step_seconds": t,
                        "speedup": t1 / t,
                        "efficiency": t1 / (n * t),
                    }
                )
    return {"net": list(PAPER), "gradient_bytes": s, "latency_seconds": LATENCY, "rows": rows}


def markdown(info: dict) -> str:
    lines = [
        "# Data-parallel scaling (CPU, one thread per process, global batch 100)",
        "",
        f"Command: `{info['machine']['command']}`  ",
        f"Machine: {info['machine']['processor']}, {info['machine']['cpu_count']} cores, "
        f"torch {info['machine']['torch']}, {info['machine']['date']}  ",
        "Load average (1, 5, 15 min) before / after the measured runs: "
        f"{info['load_average_1_5_15_min']['before']} / "
        f"{info['load_average_1_5_15_min']['after']}",
        "",
        "| step | processes | ms/step | samples/s | efficiency | bytes/step/rank | "
        "all-reduce alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in info["measured"]:
        ar = r.get("allreduce_ms")
        lines.append(
            f"| {r['algorithm']} ({r['kind']}) | {r['processes']} | {r['ms_per_step']:.2f} | "
            f"{r['samples_per_second']:.0f} | {r['efficiency']:.2f} | "
            f"{r.get('bytes_per_step', 0):,} | "
            + (f"{ar:.2f} ms ({r['allreduce_bytes']:,} B) |" if ar else "- |")
        )
    m = info.get("model")
    if m:
        lines += [
            "",
            f"## Model: 4 x 2000 on N machines ({m['gradient_bytes']:,} gradient bytes, "
            f"ring all-reduce, latency {m['latency_seconds'] * 1e6:.0f} us)",
            "",
            "| step | machines | link | compute ms | all-reduce ms | speedup | efficiency |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            if r["machines"] == 1 and r["link"] != "10 Gbit/s":
                continue
            lines.append(
                f"| {r['algorithm']} | {r['machines']} | {r['link']} | "
                f"{r['compute_seconds'] * 1e3:.1f} | {r['allreduce_seconds'] * 1e3:.1f} | "
                f"{r['speedup']:.2f} | {r['efficiency']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-model", action="store_true", help="no 4 x 2000 model")
    p.add_argument("--worker", choices=list(PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE.parent / "results")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.rounds)))
        return
    measured, loopback = [], []
    load_before = os.getloadavg()
    for alg in ("ff", "bp"):
        base = None
        for kind, world in (("ordinary", 0), ("data-parallel", 1), ("data-parallel", 2)):
            ranks = launch(alg, world, args.steps, args.rounds)
            t = max(r["seconds_per_step"] for r in ranks)  # the slowest rank sets the pace
            base = base or t
            n = max(world, 1)
            row = {
                "algorithm": alg,
                "kind": kind,
                "processes": n,
                "ms_per_step": 1e3 * t,
                "samples_per_second": BATCH / t,
                "efficiency": base / (n * t),
                "ranks": ranks,
            }
            if world:
                row["bytes_per_step"] = ranks[0]["bytes_per_step"]
            if world == 2:
                row["allreduce_ms"] = 1e3 * ranks[0]["allreduce_seconds"]
                row["allreduce_bytes"] = ranks[0]["allreduce_bytes"]
                loopback.append(ranks[0]["allreduce_bytes"] / ranks[0]["allreduce_seconds"])
            measured.append(row)
            print(
                f"{alg:>2} {kind:>13} x{n}: {row['ms_per_step']:7.2f} ms/step "
                f"{row['samples_per_second']:7.0f} samples/s  efficiency {row['efficiency']:.2f}"
                f"  bytes/step {row.get('bytes_per_step', 0):,}"
            )
    info = {"machine": machine_info(CPU), "measured": measured}
    info["machine"]["torch_threads"] = 1
    # other work on the machine slows the 2-process runs most: the load averages say how much
    info["load_average_1_5_15_min"] = {"before": load_before, "after": os.getloadavg()}
    info["loopback_bytes_per_second"] = statistics.median(loopback)
    if not args.skip_model:
        info["model"] = model(args.steps, info["loopback_bytes_per_second"])
    md = markdown(info)
    print(md)
    path = write_result(args.out, "distributed_cpu", info)
    path.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
