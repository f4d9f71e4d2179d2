"""FF vs backprop speed, as fractions of this machine's own float32 matmul rate.

    python benchmarks/bench_ff.py [--data-dir DIR] [--device cpu|cuda] [--quick] [--rounds N]

For 4 x 2000 and 3 x 1000 at batch 100 and 1000 it measures, in one run: FF training
samples/s, backprop-twin training samples/s, goodness-scoring and softmax-head inference
samples/s, and the float32 matmul rate measured right before and after each of them (the rate
of a shared machine drifts within minutes). The four are timed in turn, in N rounds (default
3, about 1 s each, each round starting one entry later); an entry's figures are those of its
median round (by fraction of the matmul rate; the lower middle one for even N), and the FF/BP
time ratio is the median of the rounds' own ratios (FF and BP timed seconds apart), so it can
differ slightly from the ratio of the two samples/s shown. FLOPs counted are those of the
matrix products each algorithm requires (2 * m * n * k per product; elementwise work is not
counted):

- FF training, per sample: layer 0: the image product (shared by the positive, negative and
  neutral passes) and one weight-gradient product (positive and negative share the input
  scale): 2 * 2 * Dx * H0. Layer l >= 1: three forward passes (positive, negative, neutral)
  and two weight-gradient products: 5 * 2 * H_{l-1} * H_l. Head: forward + gradient, 2 * 2 * F * C.
- Backprop, per sample: forward 2 * fan_in * fan_out per layer (output layer included),
  weight gradient the same, input gradient the same for every layer but the first.
- Goodness scoring, per image: one image product 2 * Dx * H0, then C passes through layers
  1..L-1: C * sum 2 * H_{l-1} * H_l.
- Softmax head inference, per image: one neutral pass 2 * (Dx * H0 + sum H_{l-1} * H_l) + head.

Then the locally connected layers of the mnist-ff-unsup-local preset (see :func:`bench_local`):
each layer's FF work (forward and weight gradient on the positive and negative rows), 2 * 2 *
(2 L C_out K) FLOPs per sample, and the whole unsupervised step of that net.

Results go to benchmarks/results/ff-<device>-<date>.json and a table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

import fflab
from fflab._runtime import tune_allocator
from fflab.backprop import BPNet, BPNetConfig, BPTrainConfig, sgd_step_
from fflab.backprop import make_optimizer as make_bp_optimizer
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, FFTrainer

D, C = 784, 10


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, n=2048, seconds=0.7) -> float:
    """Float32 GFLOP/s of an n x n product on ``device`` (best of repeated timings)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def timed(fn, device, min_seconds: float, warmup: float = 0.25) -> float:
    """Seconds per call of ``fn`` over at least ``min_seconds``, after ``warmup`` seconds of
    calls (at least two) that refill the caches the matmul probe before it has flushed."""
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < warmup:
        fn()
        n += 1
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n >= 3 and time.perf_counter() - t0 >= min_seconds:
            break
    sync(device)
    return (time.perf_counter() - t0) / n


def machine_info(device) -> dict:
    """Command, date, machine and versions for a result file."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def write_result(out: Path, prefix: str, info: dict) -> Path:
    """Write ``info`` to ``out/<prefix>-<UTC time>.json`` atomically (temporary name, rename)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    path = out / f"{prefix}-{stamp}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def flops(hidden):
    dx = D - C  # overlay: the label replaces C pixels
    pairs = list(zip(hidden[:-1], hidden[1:], strict=True))
    deep = sum(2 * a * b for a, b in pairs)
    head_f = sum(hidden[1:]) if len(hidden) > 1 else hidden[0]
    ff_train = 2 * 2 * dx * hidden[0] + 5 * deep + 2 * 2 * head_f * C
    fan = [(D, hidden[0]), *pairs, (hidden[-1], C)]
    fwd = sum(2 * a * b for a, b in fan)
    bp_train = 3 * fwd - 2 * D * hidden[0]
    goodness = 2 * dx * hidden[0] + C * deep
    softmax = 2 * dx * hidden[0] + deep + 2 * head_f * C
    return {"ff_train": ff_train, "bp_train": bp_train, "goodness": goodness, "softmax": softmax}


def bench_one(hidden, batch, x, y, device, min_seconds, n_rounds=3):
    g = torch.Generator(device=device).manual_seed(0)
    init = torch.Generator().manual_seed(0)
    ff = FFNet(FFNetConfig(hidden=hidden, label_mode="overlay"), generator=init).to(device)
    tr = FFTrainer(ff, FFTrainConfig())
    bp = BPNet(BPNetConfig(hidden=hidden, label_input="neutral"), generator=init).to(device)
    opt = make_bp_optimizer(bp, BPTrainConfig())  # what `fflab train` uses
    n = x.shape[0] // batch
    state = {"i": 0}

    def nxt():
        i = state["i"] = (state["i"] + 1) % n
        return x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]

    def ff_step():
        tr.step(*nxt(), g)

    def bp_step():  # what `fflab train` runs: hand-derived gradients folded into momentum
        sgd_step_(bp, opt, *nxt())

    def scoring():
        ff.label_scores(nxt()[0])

    def softmax():
        ff.head_logits(nxt()[0])

    fl = flops(hidden)
    entries = [
        ("ff_train", ff_step, "ff_train"),
        ("bp_train", bp_step, "bp_train"),
        ("goodness_inference", scoring, "goodness"),
        ("softmax_inference", softmax, "softmax"),
    ]
    # rounds of all four, each timing between two matmul probes (a probe ends one timing and
    # starts the next), each round starting one entry later; each round's FF/BP ratio compares
    # timings seconds apart
    rounds, probe = [], matmul_rate(device)
    for r in range(n_rounds):
        got = {}
        for name, fn, key in entries[r % 4 :] + entries[: r % 4]:
            sec = timed(fn, device, min_seconds)
            after = matmul_rate(device)
            sps, rate = batch / sec, (probe + after) / 2
            gflops = fl[key] * sps / 1e9
            got[name] = {"samples_per_second": sps, "gflops": gflops, "matmul_gflops": rate}
            got[name]["fraction_of_matmul"] = gflops / rate
            probe = after
        got["ff_bp_time_ratio"] = (
            got["bp_train"]["samples_per_second"] / got["ff_train"]["samples_per_second"]
        )
        rounds.append(got)
    row = {"hidden": list(hidden), "batch": batch}
    for name, _, key in entries:  # each entry's median round (by fraction of the matmul rate)
        by_fraction = sorted(rounds, key=lambda r: r[name]["fraction_of_matmul"])
        row[name] = {**by_fraction[(len(rounds) - 1) // 2][name], "flops_per_sample": fl[key]}
    row["ff_bp_time_ratio"] = statistics.median(r["ff_bp_time_ratio"] for r in rounds)
    row["ff_bp_flop_ratio"] = fl["ff_train"] / fl["bp_train"]
    row["rounds"] = rounds
    return row


def local_layer_flops(layer) -> int:
    """FLOPs per input row of a local layer's forward or weight gradient: 2 L C_out K."""
    return 2 * layer.locations * layer.out_shape[0] * layer.fan_in


def unsup_step_flops(net) -> int:
    """FLOPs per sample of an unsupervised FF step (forward and weight gradient of every layer
    on one positive and one negative row): 2 * 2 * (2 L C_out K) for a locally connected
    layer, 2 * 2 * (2 in out) = 8 in out for a dense one."""
    from fflab.ff.local import LocallyConnected2d

    return sum(
        2 * 2 * local_layer_flops(m) if isinstance(m, LocallyConnected2d) else 8 * m.weight.numel()
        for m in net.layers
    )


def bench_local(device, min_seconds, n_rounds=3, batch=100):
    """Locally connected layers of the mnist-ff-unsup-local preset, timed as FF trains them.

    Per layer: ``forward`` on the 2B positive and negative rows and ``local_grad`` on them
    (what an FF step asks of a layer), FLOPs 2 * 2B * (2 L C_out K). Then the whole
    unsupervised FF step of the preset's net (hybrid negatives, peer normalization), FLOPs
    counted the same way for all its layers. Each timing sits between two matmul probes;
    the median round (by fraction) is reported.
    """
    from fflab.ff.local import LocallyConnected2d
    from fflab.presets import resolve

    cfg = resolve("mnist-ff-unsup-local").model
    init = torch.Generator().manual_seed(0)
    net = FFNet(cfg, generator=init).to(device)
    tr = FFTrainer(net, FFTrainConfig(negatives="hybrid"))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, cfg.in_features, generator=init).to(device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    entries = []
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, LocallyConnected2d):
            continue
        h = torch.rand(2 * batch, layer.in_features, generator=init).to(device)
        dz = torch.randn(2 * batch, layer.out_features, generator=init).to(device)

        def layer_step(layer=layer, h=h, dz=dz):
            with torch.no_grad():
                layer(h)
                layer.local_grad(h, dz, lambda p, a, b=None, columns=None: None)

        name = f"layer{i} {layer.in_shape}->{layer.out_shape} k={layer.kernel_size}"
        entries.append((name, layer_step, 2 * 2 * local_layer_flops(layer)))
    step_flops = unsup_step_flops(net)
    entries.append(("unsupervised FF step", lambda: tr.step(x, y, g), step_flops))
    rows, probe = [], matmul_rate(device)
    results = {name: [] for name, _, _ in entries}
    for _ in range(n_rounds):
        for name, fn, fl in entries:
            sec = timed(fn, device, min_seconds)
            after = matmul_rate(device)
            sps, rate = batch / sec, (probe + after) / 2
            results[name].append(
                {
                    "samples_per_second": sps,
                    "gflops": fl * sps / 1e9,
                    "matmul_gflops": rate,
                    "fraction_of_matmul": fl * sps / 1e9 / rate,
                    "flops_per_sample": fl,
                }
            )
            probe = after
    for name, _, _ in entries:
        by_fraction = sorted(results[name], key=lambda r: r["fraction_of_matmul"])
        rows.append({"entry": name, "batch": batch, **by_fraction[(n_rounds - 1) // 2]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="shorter timings (noisier)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per entry (median reported)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    tune_allocator()
    dev = args.device
    device = torch.device(
        "cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev)
    )
    try:
        from fflab.data import load_mnist

        ds = load_mnist(args.data_dir)
        x, y = ds.train.x[:20000].to(device), ds.train.y[:20000].to(device)
        source = "mnist"
    except Exception as e:  # the benchmark measures speed; random images do as well
        print(f"note: MNIST unavailable ({e}); timing on random images", file=sys.stderr)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(20000, D, generator=gen).to(device)
        x[:, :C] = 0
        y = torch.randint(0, C, (20000,), generator=gen).to(device)
        source = "random"
    min_seconds = 0.3 if args.quick else 1.0  # per round
    rows = []
    for hidden in [(2000, 2000, 2000, 2000), (1000, 1000, 1000)]:
        for batch in (100, 1000):
            rows.append(bench_one(hidden, batch, x, y, device, min_seconds, args.rounds))
            r = rows[-1]
            print(
                f"{'x'.join(map(str, hidden)):>19} b={batch:<5}"
                + "".join(
                    f" {k[:-6] if k.endswith('_train') else k[:8]:>9}"
                    f" {r[k]['samples_per_second']:8.0f}/s {100 * r[k]['fraction_of_matmul']:3.0f}%"
                    for k in ("ff_train", "bp_train", "goodness_inference", "softmax_inference")
                )
                + f"  FF/BP time {r['ff_bp_time_ratio']:.2f} flops {r['ff_bp_flop_ratio']:.2f}",
                flush=True,
            )
    local_rows = bench_local(device, min_seconds, args.rounds)
    for r in local_rows:
        print(
            f"local {r['entry']:>44} b={r['batch']}: {r['samples_per_second']:7.0f}/s "
            f"{r['gflops']:6.1f} GFLOP/s, {100 * r['fraction_of_matmul']:3.0f}% of matmul",
            flush=True,
        )
    info = {
        **machine_info(device),
        "fflab": fflab.__version__,
        "data": source,
        "results": rows,
        "local": local_rows,
    }
    write_result(args.out, f"ff-{device.type}", info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
