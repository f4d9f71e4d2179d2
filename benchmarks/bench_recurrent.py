"""Recurrent FF's training cost against supervised FF of the same widths, and its fraction of
this machine's float32 matmul rate.

    python benchmarks/bench_recurrent.py [--data-dir DIR] [--device cpu|cuda] [--rounds N]
        [--min-seconds S]

For each width (2 x 500, 2 x 2000 and 3 x 2000 at batch 100, the recurrent presets' shapes) it
times, in N alternating rounds, one recurrent FF training step (8 iterations, every
iteration's loss trains), one supervised FF step, recurrent inference (every label, the
scoring window's 5 iterations) and supervised goodness scoring, each between two matmul
probes (:func:`bench_ff.matmul_rate`); an entry's figures are those of its median round, and
the cost ratio is the median of the rounds' own ratios. FLOPs counted are those of the matrix
products the recurrent step requires (2 m n k each; elementwise work not counted), per image
with L hidden layers, T iterations and a training window of n_w of them:

- bottom-up start: 2 (D H_0 + sum_{i>=1} H_{i-1} H_i); head: 2 * 2 F C;
- each iteration, positive and negative rows: 2 * 2 (sum_{i>=1} H_{i-1} H_i + sum_{i<L-1}
  H_{i+1} H_i + C H_{L-1}) (layer 0's product with the image is the start's, reused);
- weight gradients: 2 D H_0 (layer 0's image weights take the summed dz of both phases and
  every iteration), n_w * 2 * 2 (sum_{i>=1} H_{i-1} H_i + sum_{i<L-1} H_{i+1} H_i), and
  2 * 2 C H_{L-1} for the label's weights.
- inference, per image: the start, then C labels x T' iterations of the per-iteration work
  of one row.

Results go to benchmarks/results/recurrent-<device>-<date>.json and a table is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_ff import flops as ff_flops  # noqa: E402
from bench_ff import machine_info, matmul_rate, timed, write_result  # noqa: E402

import fflab  # noqa: E402
from fflab.ff.model import FFNet, FFNetConfig  # noqa: E402
from fflab.ff.recurrent import RecurrentFFConfig, RecurrentFFNet  # noqa: E402
from fflab.ff.recurrent_train import RecurrentTrainer  # noqa: E402
from fflab.ff.train import FFTrainConfig, FFTrainer  # noqa: E402

D, C = 784, 10
SHAPES = [(500, 500), (2000, 2000), (2000, 2000, 2000)]


def recurrent_flops(hidden, iterations=8, window=8, score_iterations=5) -> dict[str, int]:
    """FLOPs per image of a recurrent training step and of inference (see the module doc)."""
    up = sum(a * b for a, b in zip(hidden[:-1], hidden[1:], strict=True))
    down = up  # down[i] maps H_{i+1} -> H_i: the same products, transposed
    head_f = sum(hidden)
    start = 2 * (D * hidden[0] + up)
    per_row = 2 * (up + down + C * hidden[-1])  # one iteration of one row
    train = (
        start
        + 2 * 2 * head_f * C
        + iterations * 2 * per_row
        + 2 * D * hidden[0]
        + window * 2 * 2 * (up + down)
        + 2 * 2 * C * hidden[-1]
    )
    infer = start + C * score_iterations * per_row
    return {"train": train, "inference": infer}


def bench_shape(hidden, x, y, device, min_seconds, n_rounds):
    init = torch.Generator().manual_seed(0)
    g = torch.Generator(device=device).manual_seed(0)
    rec = RecurrentFFNet(RecurrentFFConfig(hidden=hidden), generator=init).to(device)
    rec_tr = RecurrentTrainer(rec, FFTrainConfig())
    sup = FFNet(FFNetConfig(hidden=hidden, label_mode="overlay"), generator=init).to(device)
    sup_tr = FFTrainer(sup, FFTrainConfig())
    batch, n = 100, x.shape[0] // 100
    state = {"i": 0}

    def nxt():
        i = state["i"] = (state["i"] + 1) % n
        return x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]

    fl_rec, fl_sup = recurrent_flops(hidden), ff_flops(hidden)
    entries = [
        ("recurrent_train", lambda: rec_tr.step(*nxt(), g), fl_rec["train"]),
        ("supervised_train", lambda: sup_tr.step(*nxt(), g), fl_sup["ff_train"]),
        ("recurrent_inference", lambda: rec.label_scores(nxt()[0]), fl_rec["inference"]),
        ("supervised_inference", lambda: sup.label_scores(nxt()[0]), fl_sup["goodness"]),
    ]
    rounds, probe = [], matmul_rate(device)
    for r in range(n_rounds):
        got = {}
        for name, fn, fl in entries[r % 4 :] + entries[: r % 4]:
            sec = timed(fn, device, min_seconds)
            after = matmul_rate(device)
            sps, rate = batch / sec, (probe + after) / 2
            got[name] = {
                "samples_per_second": sps,
                "gflops": fl * sps / 1e9,
                "matmul_gflops": rate,
                "fraction_of_matmul": fl * sps / 1e9 / rate,
                "flops_per_sample": fl,
            }
            probe = after
        got["train_cost_ratio"] = (
            got["supervised_train"]["samples_per_second"]
            / got["recurrent_train"]["samples_per_second"]
        )
        got["inference_cost_ratio"] = (
            got["supervised_inference"]["samples_per_second"]
            / got["recurrent_inference"]["samples_per_second"]
        )
        rounds.append(got)
    row = {"hidden": list(hidden), "batch": batch}
    for name, _, _ in entries:
        by_fraction = sorted(rounds, key=lambda r: r[name]["fraction_of_matmul"])
        row[name] = by_fraction[(len(rounds) - 1) // 2][name]
    for key in ("train_cost_ratio", "inference_cost_ratio"):
        row[key] = statistics.median(r[key] for r in rounds)
    row["train_flop_ratio"] = fl_rec["train"] / fl_sup["ff_train"]
    row["rounds"] = rounds
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="MNIST folder (default: fflab's lookup)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ds = fflab.load_dataset("mnist", args.data_dir)
    x, y = ds.train.x[:20000].to(device), ds.train.y[:20000].to(device)
    rows = [bench_shape(h, x, y, device, args.min_seconds, args.rounds) for h in SHAPES]
    info = {**machine_info(device), "results": rows}
    print(
        f"{'hidden':>16} {'rec img/s':>10} {'sup img/s':>10} {'cost x':>7} {'FLOP x':>7} "
        f"{'rec %mm':>8} {'inf cost x':>10} {'inf %mm':>8}"
    )
    for r in rows:
        print(
            f"{'x'.join(map(str, r['hidden'])):>16} "
            f"{r['recurrent_train']['samples_per_second']:10.0f} "
            f"{r['supervised_train']['samples_per_second']:10.0f} "
            f"{r['train_cost_ratio']:7.2f} {r['train_flop_ratio']:7.2f} "
            f"{100 * r['recurrent_train']['fraction_of_matmul']:7.0f}% "
            f"{r['inference_cost_ratio']:10.2f} "
            f"{100 * r['recurrent_inference']['fraction_of_matmul']:7.0f}%"
        )
    write_result(args.out, f"recurrent-{device.type}", info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
