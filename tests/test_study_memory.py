"""The memory study: the layerwise FF schedule against the forward-first one (the same update,
bit for bit), the allocator measurement against tensors of known size, the hand counts
against closed forms and against the measurement, and the study end to end on digits."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fflab.backprop import BPNet, BPNetConfig, BPTrainConfig, make_optimizer, sgd_step_
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, FFTrainer
from fflab.studies import StudyContext, run_study
from fflab.studies.memory import crossover
from fflab.studies.memory_probe import (
    Tape,
    bp_step_bytes,
    cpu_peak_bytes,
    ff_step_bytes,
    state_bytes,
)


def _train(mcfg, tcfg, dtype, schedule, batch=13, steps=3, active=None):
    """Weights, optimizer state, stats and unit activity after ``steps`` steps."""
    g = torch.Generator().manual_seed(0)
    net = FFNet(mcfg, generator=g).to(dtype)
    trainer = FFTrainer(net, dataclasses.replace(tcfg, step_schedule=schedule))
    gd = torch.Generator().manual_seed(1)
    x = torch.rand(steps * batch, mcfg.in_features, generator=gd, dtype=dtype)
    y = torch.randint(0, 10, (steps * batch,), generator=gd)
    gs = torch.Generator().manual_seed(2)
    rows = [slice(i * batch, (i + 1) * batch) for i in range(steps)]
    stats = [trainer.step(x[r], y[r], gs, active) for r in rows]
    opt = trainer.optimizer.state_dict()["state"]
    return net.state_dict(), opt, stats, trainer.unit_activity()


CASES = {
    "concat, dropout": (
        FFNetConfig(in_features=64, hidden=(50, 40, 30), label_mode="concat"),
        FFTrainConfig(dropout=0.2, input_dropout=0.1),
        None,
    ),
    "overlay, meansq, greedy layer 1": (
        FFNetConfig(in_features=64, hidden=(50, 40, 30), label_mode="overlay", goodness="meansq"),
        FFTrainConfig(negatives="random"),
        range(1, 2),
    ),
    "unsupervised, hybrids, dropout": (
        FFNetConfig(
            in_features=64, hidden=(50, 40), label_mode="none", image_shape=(1, 8, 8), head_from=0
        ),  # fmt: skip
        FFTrainConfig(negatives="hybrid", dropout=0.3),
        None,
    ),
    "adam (gradients in .grad)": (
        FFNetConfig(in_features=64, hidden=(30, 20), label_mode="concat", head_from=0),
        FFTrainConfig(optimizer="adam"),
        None,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_layerwise_schedule_is_the_forward_first_update_bit_for_bit(case, dtype, one_thread):
    mcfg, tcfg, active = CASES[case]
    a = _train(mcfg, tcfg, dtype, "forward_first", active=active)
    b = _train(mcfg, tcfg, dtype, "layerwise", active=active)
    for k in a[0]:  # weights, head and peer-normalization running means
        assert torch.equal(a[0][k], b[0][k]), k
    for k in a[1]:
        for name, v in a[1][k].items():
            assert not torch.is_tensor(v) or torch.equal(v, b[1][k][name]), (k, name)
    assert all(torch.equal(s, t) for s, t in zip(a[2], b[2], strict=True))
    assert a[3] == b[3] and len(a[3]) == len(mcfg.hidden)


def test_step_schedule_is_checked():
    with pytest.raises(ValueError, match="step_schedule must be forward_first or layerwise"):
        FFTrainConfig(step_schedule="stacked")
    from fflab.ff.recurrent import RecurrentFFConfig, RecurrentFFNet

    net = RecurrentFFNet(RecurrentFFConfig(in_features=64, hidden=(20, 20)))
    with pytest.raises(ValueError, match="layerwise needs a feed-forward FFNet"):
        FFTrainer(net, FFTrainConfig(step_schedule="layerwise"))


def test_cpu_peak_bytes_sees_tensors_of_known_size():
    def fn():
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000: 8,000 alive
        del a
        c = torch.empty(250)  # 1,000: 5,000 alive
        return b, c

    assert cpu_peak_bytes(fn) == 8000
    keep = torch.empty(10_000)  # held before: not part of the peak
    # (3, 7) int64 (168 bytes), the one-value long copy (8), then the sum (168)
    step = lambda: torch.empty(3, 7, dtype=torch.int64) + keep[:1].long()  # noqa: E731
    assert cpu_peak_bytes(step) == 2 * 168 + 8
    assert keep.numel() == 10_000


def test_tape_by_hand():
    t = Tape()
    t.alloc("a", 10)
    t.moment("tmp", 5)
    t.alloc("b", 3)
    t.free("a")
    t.alloc("c", 11)
    assert (t.peak, t.at_peak, t.total) == (15, ["a", "tmp"], 14)
    with pytest.raises(ValueError, match="already alive"):
        t.alloc("b", 1)


@pytest.mark.parametrize("depth", [3, 4, 8])
def test_counts_equal_their_closed_forms(depth):
    """Uniform widths H >= D: the peaks derived on paper from the steps' code."""
    b, d, h, c, s, n = 10, 64, 100, 10, 4, 20
    hid = (h,) * depth
    # forward-first: a_img, label_in, every a_l (N, H), h_1..h_{L-1}, every layer's sums of
    # squares and loss coefficients (N each), then dz_0 and dz_img
    acts = n * h * depth + n * h * (depth - 1)
    want = s * (b * h + n * c + acts + 2 * depth * n + n * h + b * h)
    assert ff_step_bytes(b, d, hid, label_mode="concat", head_from=1) == want
    # layerwise, head on the last three: building layer 0's input, a_img + z_img + two
    # (N, H_0) temporaries + z_0, next to the table of sums of squares (L, N)
    lw = {"label_mode": "concat", "schedule": "layerwise"}
    first = 8 * b * h + n * c + depth * n
    assert ff_step_bytes(b, d, hid, head_from=depth - 3, **lw) == s * first
    # head on layers 1..: the neutral pass's features (B, (L - 1) H) next to a_img, h and a
    assert ff_step_bytes(b, d, hid, head_from=1, **lw) == s * max(first, b * h * (depth + 2))
    # unsupervised layerwise: the hybrids (B, D), then h, a and dz of one layer (N, H), the
    # sums of squares and the loss coefficients (L, N)
    assert ff_step_bytes(b, d, hid, label_mode="none", schedule="layerwise") == s * (
        b * d + 3 * n * h + 2 * depth * n
    )
    # backprop: every normalized input (B, D + L H), then dz, dL/dh and the new dz (B, H) and
    # the ReLU gate (B, H) of bools
    assert bp_step_bytes(b, d, hid, neutral_label=False) == s * b * (d + depth * h + 3 * h) + b * h


def _ff_case(mode, schedule, b, d, hidden):
    img = (1, 8, 8)
    mcfg = FFNetConfig(in_features=d, hidden=hidden, label_mode=mode, head_from=1,
                       image_shape=img if mode == "none" else ())  # fmt: skip
    tcfg = FFTrainConfig(step_schedule=schedule, negatives="hybrid" if mode == "none" else "hard")
    g = torch.Generator().manual_seed(0)
    net = FFNet(mcfg, generator=g)
    tr = FFTrainer(net, tcfg)
    x, y = torch.rand(b, d, generator=g), torch.randint(0, 10, (b,), generator=g)
    tr.step(x[:2], y[:2], g)  # the optimizer state now exists
    counted = ff_step_bytes(b, d, hidden, schedule=schedule, label_mode=mode, head_from=1)
    return cpu_peak_bytes(lambda: tr.step(x, y, g)), counted, state_bytes(net, tr.optimizer)


# The count leaves out vectors of one value per row or unit: on these small nets it is 0-8%
# under the measurement, never over.
TOLERANCE = (1.0, 1.08)


@pytest.mark.parametrize("hidden", [(128, 96, 160), (64,) * 6])
@pytest.mark.parametrize("mode", ["overlay", "none"])
def test_counted_peak_matches_the_measured_one(mode, hidden, one_thread):
    b, d = 64, 64
    peaks = {}
    for schedule in ("forward_first", "layerwise"):
        measured, counted, state = _ff_case(mode, schedule, b, d, hidden)
        assert TOLERANCE[0] <= measured / counted <= TOLERANCE[1], (schedule, measured, counted)
        peaks[schedule] = measured
    assert peaks["layerwise"] < peaks["forward_first"]
    # parameters: every layer's weights and biases, the head, peer-normalization means (an
    # overlay net's input is D wide); velocities for the parameters a step trains (the
    # unsupervised net's head is its probe, trained after FF)
    widths = (d, *hidden)
    layers = sum(i * o + o for i, o in zip(widths[:-1], widths[1:], strict=True))
    head = (sum(hidden[1:]) + 1) * 10
    assert state["parameters"] == 4 * (layers + head + sum(hidden))
    assert state["optimizer"] == 4 * (layers + (head if mode == "overlay" else 0))


@pytest.mark.parametrize("hidden", [(128, 96, 160), (64,) * 6])
@pytest.mark.parametrize("neutral", [True, False])
def test_counted_backprop_peak_matches_the_measured_one(hidden, neutral, one_thread):
    b, d = 64, 64
    net = BPNet(BPNetConfig(in_features=d, hidden=hidden,
                            label_input="neutral" if neutral else "none"))  # fmt: skip
    opt = make_optimizer(net, BPTrainConfig())
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(b, d, generator=g), torch.randint(0, 10, (b,), generator=g)
    sgd_step_(net, opt, x[:2], y[:2])
    measured = cpu_peak_bytes(lambda: sgd_step_(net, opt, x, y))
    counted = bp_step_bytes(b, d, hidden, neutral_label=neutral)
    assert TOLERANCE[0] <= measured / counted <= TOLERANCE[1]


def test_crossover_by_hand():
    assert crossover([1, 2, 4, 8], [5, 5, 5, 5], [1, 4, 6, 9]) == 4
    assert crossover([1, 2, 4], [1, 5, 1], [2, 4, 2]) == 4  # below at 1, above at 2: from 4
    assert crossover([1, 2], [3, 3], [1, 2]) is None


def test_memory_study_on_digits(tmp_path, one_thread):
    from sklearn.datasets import load_digits

    dg = load_digits()
    x, y = (dg.data / 16.0).astype(np.float32), dg.target
    data = {"x_train": x[:1400], "y_train": y[:1400], "x_test": x[1400:], "y_test": y[1400:],
            "image_shape": (8, 8)}  # fmt: skip
    settings = {"depths": [1, 3, 6], "widths": [48], "batches": [32], "timed_steps": 2,
                "timed_seconds": 0, "timed_batches": [32]}  # fmt: skip
    ctx = StudyContext(out_dir=tmp_path / "mem", quick=True, data=data,
                       settings={"memory": settings})  # fmt: skip
    out = run_study("memory", ctx)
    assert len(out["rows"]) == 3 * 5 and out["in_features"] == 64 and out["label"] == "concat"
    by = {(r["method"], r["depth"]): r for r in out["rows"]}
    for r in out["rows"]:
        assert 1.0 <= r["measured"] / r["counted"] <= 1.15 and r["seconds_per_step"] > 0
    # forward-first grows with depth; layerwise keeps one layer alive, and only its tables of
    # one value per row and layer grow (2 x 3 more layers x 64 rows x 4 bytes)
    assert by[("ff-unsup", 6)]["measured"] > 1.5 * by[("ff-unsup", 3)]["measured"]
    lw3, lw6 = (by[("ff-unsup-layerwise", k)]["measured"] for k in (3, 6))
    assert 0 < lw6 - lw3 < 2 * 2 * 3 * 64 * 4
    # FF and its backprop twin: the same widths, the same parameter bytes but for the head
    assert by[("bp", 6)]["parameters"] < by[("ff-sup", 6)]["parameters"]
    s = out["summary"]["width48-batch32"]
    assert s["ff-sup"]["crossover_depth"] is None and s["ff-sup"]["ratio_to_bp_at_6"] > 1.5
    assert s["ff-unsup-layerwise"]["ratio_to_bp_at_6"] < 1
    assert set(s["speed"]["sup"]) == set(s["speed_cpu"]["unsup"]) == {"1", "3", "6"}
    assert all(r["timed_rounds"] == 2 and r["cpu_seconds_per_step"] > 0 for r in out["rows"])
    report = (tmp_path / "mem" / "report.md").read_text()
    assert "## Answer" in report and "FF supervised, layerwise" in report
    for png in ("memory.png", "memory_counted.png"):
        assert (tmp_path / "mem" / png).stat().st_size > 5000
    # the counts over the full grid: every step's bytes are proportional to the batch
    cg = {(r["method"], r["width"], r["batch"], r["depth"]): r["counted"]
          for r in out["counted_grid"]["rows"]}  # fmt: skip
    assert cg[("bp", 2000, 1000, 32)] == 10 * cg[("bp", 2000, 100, 32)]
    assert "## Counted over the whole grid" in report
    assert json.loads((tmp_path / "mem" / "results.json").read_text())["study"] == "memory"
    with pytest.raises(ValueError, match="unknown memory settings"):
        run_study("memory", StudyContext(out_dir=tmp_path / "x", data=data,
                                         settings={"memory": {"depth": [2]}}))  # fmt: skip
