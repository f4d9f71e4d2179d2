"""Recurrent FF: the synchronous update by hand, the fast step against autograd, batched
inference against a loop over labels, and runs (learning on digits, bit-exact resume)."""

import json

import numpy as np
import pytest
import torch
from run_helpers import stop_at_second_checkpoint

import fflab
from fflab.ff.recurrent import RecurrentFFConfig, RecurrentFFNet
from fflab.ff.recurrent_train import RecurrentTrainer, iteration_report
from fflab.ff.reference import RecurrentReferenceTrainer
from fflab.ff.train import FFTrainConfig
from fflab.plots import recurrent_figure


def net_for(hidden=(7, 6), seed=0, **kw):
    cfg = RecurrentFFConfig(in_features=20, num_classes=4, hidden=hidden, **kw)
    return RecurrentFFNet(cfg, generator=torch.Generator().manual_seed(seed)).double()


def batch(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 20, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 4, (n,), generator=g)


def rms(v):
    return v / torch.sqrt(v.square().mean(1, keepdim=True) + 1e-8)


def test_synchronous_update_equals_a_hand_unrolled_two_layer_two_step_computation():
    net = net_for(hidden=(7, 6), damping=0.3)
    x, y = batch()
    W1, b1, W2, b2 = net.up[0].weight, net.up[0].bias, net.up[1].weight, net.up[1].bias
    V1, V2 = net.down[0].weight, net.down[1].weight  # (7, 6) from layer 2, (6, 4) from the label
    lab = rms(torch.nn.functional.one_hot(y, 4).double())
    relu = torch.relu
    # t = 0: one bottom-up pass
    s1 = relu(rms(x) @ W1.T + b1)
    s2 = relu(rms(s1) @ W2.T + b2)
    expected = [(s1, s2)]
    for _ in range(2):  # both layers from the states at t - 1 (s1 and s2 are updated together)
        n1 = 0.3 * s1 + 0.7 * relu(rms(x) @ W1.T + rms(s2) @ V1.T + b1)
        n2 = 0.3 * s2 + 0.7 * relu(rms(s1) @ W2.T + lab @ V2.T + b2)
        s1, s2 = n1, n2
        expected.append((s1, s2))
    with torch.no_grad():
        got = net.unroll(x, y, iterations=2)
    for t, (e, g) in enumerate(zip(expected, got, strict=True)):
        for i in range(2):
            torch.testing.assert_close(g[i], e[i], rtol=1e-12, atol=1e-12, msg=f"t={t} layer {i}")


@pytest.mark.parametrize("hidden", [(7,), (7, 6), (7, 6, 5)])
def test_batched_label_inference_equals_a_loop_over_labels(hidden):
    net = net_for(hidden=hidden, iterations=6)
    x, _ = batch(n=5)
    g = net.label_goodness(x, iterations=6)  # (B, C, T, L)
    assert g.shape == (5, 4, 6, len(hidden))
    with torch.no_grad():
        for c in range(4):
            out = net(x, torch.full((5,), c), iterations=6)
            torch.testing.assert_close(g[:, c], out.goodness, rtol=1e-12, atol=1e-10)
    # scores: window 3..5 over every layer, as a sum of goodness logits
    want = sum(g[:, :, t, i] for t in (2, 3, 4) for i in range(len(hidden)))
    torch.testing.assert_close(net.scores(g), want)
    torch.testing.assert_close(net.label_scores(x), net.scores(net.label_goodness(x, 5)))


CASES = [
    # (model options, train options)
    ({"hidden": (7, 6)}, {"negatives": "random"}),
    ({"hidden": (7, 6, 5)}, {"negatives": "hard"}),
    ({"hidden": (7,)}, {"negatives": "hard"}),
    ({"hidden": (7, 6, 5), "peer_norm": 0.06, "train_from": 3}, {"negatives": "hard"}),
    ({"hidden": (7, 6), "goodness": "meansq", "damping": 0.0, "head_from": 1}, {}),
    ({"hidden": (7, 6), "goodness": "minssq", "threshold": 3.0, "iterations": 3}, {}),
    # a locally connected bottom-up layer on the 4x5 image (2 channels per location)
    (
        {"hidden": (40, 6), "image_shape": (1, 4, 5), "local_kernels": (3,), "peer_norm": 0.06},
        {"negatives": "hard"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c[0].items()))
def test_fast_step_equals_autograd_with_states_detached_across_layers_and_time(case):
    model, train = case
    cfg = FFTrainConfig(**train)
    fast = RecurrentTrainer(net_for(**model), cfg)
    ref = RecurrentReferenceTrainer(net_for(**model), cfg)
    fast.fused = False  # write .grad, to compare with autograd's
    x, y = batch()
    for step in range(2):  # the second step starts from moved weights and running means
        out = []
        for tr in (fast, ref):
            stats = tr.compute_gradients(x, y, torch.Generator().manual_seed(step))
            grads = [p.grad.clone() for p in tr.net.parameters()]
            out.append((stats, grads, [b.clone() for b in tr.net.buffers()]))
            tr.apply_gradients()
        (s_f, g_f, b_f), (s_r, g_r, b_r) = out
        torch.testing.assert_close(s_f, s_r, rtol=1e-10, atol=1e-12)
        names = [n for n, _ in fast.net.named_parameters()]
        for n, a, b in zip(names, g_f, g_r, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"step {step}: {n}")
        for a, b in zip(b_f, b_r, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_step_equals_unfused():
    x, y = batch()
    nets = []
    for fused in (True, False):
        tr = RecurrentTrainer(net_for(hidden=(7, 6, 5)), FFTrainConfig())
        tr.fused = fused
        for step in range(3):
            tr.step(x, y, torch.Generator().manual_seed(step))
        nets.append(tr.net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradients_are_local_in_layer_and_time():
    """A layer's weight gradient does not change when the losses of other layers change:
    raising the threshold of layer 1 leaves layer 0's gradients untouched."""
    x, y = batch()
    grads = []
    for theta in (None, 50.0):
        net = net_for(hidden=(7, 7))
        if theta is not None:
            object.__setattr__(net.config, "threshold", None)
            net.theta = lambda i, t=theta: 7.0 if i == 0 else t
        tr = RecurrentTrainer(net, FFTrainConfig(negatives="random"))
        tr.fused = False
        tr.compute_gradients(x, y, torch.Generator().manual_seed(0))
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name in ("up.0.weight", "up.0.bias", "down.0.weight"):
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)
    assert not torch.equal(grads[0]["up.1.weight"], grads[1]["up.1.weight"])


def test_iteration_report_on_hand_made_goodness():
    net = net_for(hidden=(7,), iterations=2, score_window=(1, 2))
    # 2 images, 4 labels, 2 iterations, 1 layer; image 0 is class 1, image 1 is class 3
    g = torch.zeros(2, 4, 2, 1, dtype=torch.float64)
    g[0, 1, 0], g[0, 2, 1] = 5.0, 9.0  # iteration 1 says 1 (right), iteration 2 says 2
    g[1, 3, 0], g[1, 3, 1] = 1.0, 1.0  # right at both
    rep = iteration_report(net, g, torch.tensor([1, 3]))
    assert rep["error_by_iteration"] == [0.0, 50.0]
    assert rep["error_up_to_iteration"] == [0.0, 50.0]  # 1..2 sums: 5 vs 9 for image 0
    assert rep["goodness_pos"] == [[3.0], [0.5]]
    assert rep["goodness_neg"] == [[0.0], [1.5]]


def test_settings_are_checked_with_one_line_errors():
    for bad in (
        {"damping": 1.0},
        {"iterations": 0},
        {"train_from": 9},
        {"score_window": (4, 3)},
        {"score_window": (3,)},
        {"hidden": ()},
        {"score_from": 3},
    ):
        with pytest.raises(ValueError):
            RecurrentFFConfig(**bad)
    with pytest.raises(ValueError, match="dropout"):
        RecurrentTrainer(net_for(), FFTrainConfig(dropout=0.2))
    with pytest.raises(ValueError, match="simultaneous"):
        RecurrentTrainer(net_for(), FFTrainConfig(layer_schedule="greedy"))
    with pytest.raises(ValueError, match="wrong-label"):
        RecurrentTrainer(net_for(), FFTrainConfig(negatives="hybrid"))


# -- runs on scikit-learn's digits (no download) ----------------------------------------------
PRESET = "mnist-ff-recurrent-quick"
SETTINGS = {  # measured: 4.8% and 4.3% test error (seeds 0, 1), about 6 s on one thread
    "model": {"hidden": [300, 300], "iterations": 4, "score_window": [2, 4]},
    "train": {"epochs": 20, "batch_size": 50, "lr": 0.02, "lr_schedule": "hinton"},
}


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def test_recurrent_ff_learns_digits(tmp_path, one_thread):
    summary = fflab.train(PRESET, tmp_path / "run", data=digits(), settings=SETTINGS)
    assert summary["algorithm"] == "ff-recurrent"
    # 397 test digits; chance is 90% error, a linear model about 6%
    assert summary["test_error_goodness"] < 8.0, summary["test_error_goodness"]
    assert summary["test_error_softmax"] < 10.0
    assert len(summary["error_by_iteration"]) == 4
    assert np.array(summary["goodness_pos"]).shape == (4, 2)
    png = recurrent_figure(tmp_path / "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    net = fflab.load_run(tmp_path / "run")
    assert isinstance(net, RecurrentFFNet)
    x_te, y_te = torch.from_numpy(digits()[2]), torch.from_numpy(digits()[3])
    err = 100.0 * float((net.predict(x_te) != y_te).float().mean())
    assert err == pytest.approx(summary["test_error_goodness"])


def test_recurrent_resume_is_bit_exact(tmp_path, one_thread):
    settings = {"model": SETTINGS["model"], "train": {**SETTINGS["train"], "epochs": 3}}
    data = digits()
    whole = fflab.train(PRESET, tmp_path / "a", data=data, settings=settings)
    with stop_at_second_checkpoint():
        fflab.train(PRESET, tmp_path / "b", data=data, settings=settings)
    resumed = fflab.train(PRESET, tmp_path / "b", data=data, settings=settings, resume=True)
    a = fflab.load_run(tmp_path / "a").state_dict()
    b = fflab.load_run(tmp_path / "b").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert whole["test_error_goodness"] == resumed["test_error_goodness"]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["epoch"] for m in lines] == [1, 2, 3]


@pytest.mark.slow
def test_cli_trains_evaluates_and_draws_a_recurrent_run(tmp_path, mnist_dir):
    """``fflab train`` and ``fflab eval`` on 6,000 MNIST images, 2 x 200, 4 epochs.

    Measured: 12.5% and 14.0% test error (seeds 0, 1; chance is 90%), about a minute."""
    import subprocess
    import sys

    def fflab_cli(*args):
        r = subprocess.run(
            [sys.executable, "-m", "fflab.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        return r.returncode, r.stdout, r.stderr

    out = tmp_path / "run"
    code, stdout, err = fflab_cli(
        "train", "--preset", "mnist-ff-recurrent-quick", "--out", out, "--data-dir", mnist_dir,
        "--epochs", 4, "--set", "data.train_subset=6000", "--set", "model.hidden=200,200",
        "--quiet",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_error_goodness"] < 20.0, summary["test_error_goodness"]
    assert "iterations.png" in stdout and (out / "iterations.png").stat().st_size > 10_000
    (out / "iterations.png").unlink()
    code, stdout, err = fflab_cli("eval", out, "--data-dir", mnist_dir)
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["test_error_goodness"] == pytest.approx(
        summary["test_error_goodness"]
    )
    assert (out / "iterations.png").is_file()
