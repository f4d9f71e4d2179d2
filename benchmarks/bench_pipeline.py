"""FF's layer pipeline against one process and against data parallelism, on this machine.

    python benchmarks/bench_pipeline.py --data-dir DIR [--images N] [--nets a,b]

Every configuration is a real ``fflab train`` run of one epoch on the first N MNIST training
images (default 12,000: 120 batches of 100), one thread per process (``OMP_NUM_THREADS=1``),
launched the way a user launches it (``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m fflab train ...``; the one-process run without the launcher):

- ``one``: one ordinary process;
- ``pipeline``: two processes, ``--parallel pipeline`` (the default split by layer cost);
- ``data``: two processes, data-parallel (``--parallel data``).

Nets: ``ff-3x1000`` (``mnist-ff-quick`` with ``train.negatives=random``, the supervised
recipe a pipeline can run: hard negatives read the head, after the last stage) and
``unsup-4x2000`` (``mnist-ff-unsup``, the paper's unsupervised net). Training rate is the
epoch's images over its seconds (``metrics.jsonl``: the stages' end-of-epoch exchange
included); speed-up = rate / one-process rate; efficiency = speed-up / 2. From the pipeline
run: each stage's idle fraction (time waiting for a neighbour), their mean (the bubble),
bytes sent per batch, and whether its weights equal the one-process run's bit for bit.

The model of N stages for each net: the step's time splits over layers in proportion to
:func:`fflab.pipeline.layer_costs`; a stage takes its layers' share of the one-process batch
time, plus the part of sending its activities that the next batch's compute does not hide
(sends are asynchronous: a send shorter than the stage's compute is hidden); the pipe runs
at the slowest stage and fills and drains once per epoch of 600 batches. The model's
prediction for 2 stages is printed next to the measurement; for N = 2, 3, 4 it is given for
the gloo loopback rate measured here (bytes over the pipeline's idle-free send time is not
separable, so the loopback rate is taken from a direct send/recv timing) and for 10 and 100
Gbit/s links.

Results go to benchmarks/results/pipeline_cpu-<UTC time>.json and .md; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_ff import machine_info, write_result  # noqa: E402

NETS = {
    "ff-3x1000": ("mnist-ff-quick", ["--set", "train.negatives=random"]),
    "unsup-4x2000": ("mnist-ff-unsup", ["--set", "train.probe_epochs=1"]),
}
LINKS = {"10 Gbit/s": 1.25e9, "100 Gbit/s": 12.5e9}
EPOCH_BATCHES = 600


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(net: str, scheme: str, data_dir: str, images: int, out: Path) -> dict:
    """One epoch of ``net`` under ``scheme``; its first metrics line and wall time."""
    preset, extra = NETS[net]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [
        "-m", "fflab", "train", "--preset", preset, *extra, "--epochs", "1", "--quiet",
        "--set", f"data.train_subset={images}", "--set", "data.test_subset=1000",
        "--data-dir", data_dir, "--out", str(out),
    ]  # fmt: skip
    if scheme == "one":
        cmd = [sys.executable, *train]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc-per-node", "2", "--master-port", str(_port())]
        cmd = [*launcher, *train, "--parallel", scheme]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"command": " ".join(cmd), "wall_seconds": time.perf_counter() - t0, **metrics}


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' checkpoints hold equal tensors (bit for bit)."""
    from fflab import checkpoint

    ta, _ = checkpoint.load(a / "checkpoint.safetensors")
    tb, _ = checkpoint.load(b / "checkpoint.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def loopback_rate(nbytes: int = 1_600_000, repeats: int = 20) -> float:
    """Bytes per second of a gloo send/recv between two local processes (one message of
    ``nbytes`` at a time, as the pipeline sends)."""
    script = f"""
import os, time, torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
buf = torch.zeros({nbytes // 4})
for warm in range(3):
    dist.send(buf, 1) if dist.get_rank() == 0 else dist.recv(buf, 0)
dist.barrier()
t0 = time.perf_counter()
for _ in range({repeats}):
    dist.send(buf, 1) if dist.get_rank() == 0 else dist.recv(buf, 0)
dist.barrier()
if dist.get_rank() == 1:
    print({nbytes} * {repeats} / (time.perf_counter() - t0))
dist.destroy_process_group()
"""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", "--master-port", str(_port()), f.name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return float(done.stdout.strip().splitlines()[-1])


def net_shape(preset: str) -> tuple[list[float], int, bool]:
    """Per-layer step costs, the width of the net's last-but-one cut and supervision."""
    from fflab import presets
    from fflab.ff.model import FFNet
    from fflab.pipeline import layer_costs

    config = presets.resolve(preset, {}, seed=0)
    net = FFNet(config.model)
    return layer_costs(net), config.model.hidden, config.model.supervised


def model(costs, hidden, supervised, t_batch, stages, rate, batch=100, bytes_per=4) -> dict:
    """Predicted speed-up of ``stages`` stages (see the module docstring)."""
    from fflab.pipeline import fill_drain_bubble, partition

    sizes = partition(costs, stages)
    total, bounds = sum(costs), [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    worst = 0.0
    for k in range(stages):
        lo, hi = bounds[k], bounds[k + 1]
        compute = sum(costs[lo:hi]) / total * t_batch
        send = 0.0
        if k < stages - 1:
            rows = 3 * batch if supervised else 2 * batch  # + neutral rows when supervised
            send = rows * hidden[hi - 1] * bytes_per / rate
        worst = max(worst, compute + max(0.0, send - compute))
    speedup = t_batch / worst * (1 - fill_drain_bubble(stages, EPOCH_BATCHES))
    return {"stages": sizes, "speedup": speedup, "efficiency": speedup / stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--nets", default=",".join(NETS))
    p.add_argument("--out", type=Path, default=HERE.parent / "results")
    args = p.parse_args()
    info = machine_info(torch.device("cpu"))
    info.update(images=args.images, processes_threads=1, nets={})
    rate = loopback_rate()
    info["loopback_bytes_per_second"] = rate
    lines = [
        f"# Layer pipeline on {info['processor']} ({info['cpu_count']} cores), torch "
        f"{info['torch']}",
        "",
        f"`{info['command']}`, {info['date']}; one thread per process; one epoch on "
        f"{args.images} MNIST images; gloo loopback send rate {rate / 1e9:.2f} GB/s.",
        "",
        "| net | run | images/s | speed-up | efficiency | stage idle | bytes/batch | "
        "weights = one process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            rows = {}
            for scheme in ("one", "pipeline", "data"):
                rows[scheme] = run(
                    net, scheme, args.data_dir, args.images, Path(tmp) / net / scheme
                )
            rows["pipeline"]["weights_equal_one"] = same_weights(
                Path(tmp) / net / "one", Path(tmp) / net / "pipeline"
            )
            base = rows["one"]["samples_per_second"]
            for scheme, m in rows.items():
                m["speedup"] = m["samples_per_second"] / base
                idle = m.get("pipeline_idle")
                sent = m.get("pipeline_bytes_per_step")
                lines.append(
                    f"| {net} | {scheme} | {m['samples_per_second']:.0f} | {m['speedup']:.2f} | "
                    f"{m['speedup'] / (1 if scheme == 'one' else 2):.2f} | "
                    f"{', '.join(f'{f:.1%}' for f in idle) if idle else ''} | "
                    f"{', '.join(f'{b / 1e6:.2f} MB' for b in sent[:-1]) if sent else ''} | "
                    f"{m.get('weights_equal_one', '')} |"
                )
            costs, hidden, supervised = net_shape(NETS[net][0])
            t_batch = 100 / base
            counts = range(2, min(4, len(costs)) + 1)
            predicted = {
                name: [model(costs, hidden, supervised, t_batch, n, r) for n in counts]
                for name, r in {"loopback": rate, **LINKS}.items()
            }
            info["nets"][net] = {"runs": rows, "layer_costs": costs, "model": predicted}
    lines += [
        "",
        "Model (module docstring): predicted speed-up of N stages over one process, with the "
        "one-process batch time measured above; the 2-stage loopback prediction is the one to "
        "hold against the measured pipeline row.",
        "",
        "| net | link | N = 2 | N = 3 | N = 4 | split at N = 4 |",
        "|---|---|---|---|---|---|",
    ]
    for net, entry in info["nets"].items():
        for link, preds in entry["model"].items():
            cells = [f"{m['speedup']:.2f}x" for m in preds]
            cells = " | ".join(cells + ["-"] * (3 - len(cells)))
            split = "+".join(map(str, preds[-1]["stages"])) if len(preds) == 3 else "-"
            lines.append(f"| {net} | {link} | {cells} | {split} |")
    text = "\n".join(lines) + "\n"
    print(text)
    path = write_result(args.out, "pipeline_cpu", info)
    md = path.with_suffix(".md")
    md.with_name(md.name + ".tmp").write_text(text)
    md.with_name(md.name + ".tmp").replace(md)


if __name__ == "__main__":
    main()
