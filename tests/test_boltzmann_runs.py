"""Boltzmann runs through the run framework: rbm-smoke end to end through the CLI, AIS
against exact log Z, exact resume with PCD chains and momentum, bm-tiny's exact likelihood,
the exact enumeration of 25-unit RBMs, presets."""

import json
import math

import pytest
import torch
from run_helpers import assert_same_checkpoints, train_interrupted

from fflab import checkpoint, presets, runs
from fflab.boltzmann import RBM, exact_log_z
from fflab.boltzmann.bm_experiment import BMTrainConfig, pool_binary
from fflab.boltzmann.rbm_experiment import RBMTrainConfig, enumerate_rbm_log_z
from fflab.cli import main
from fflab.config import ConfigError, parse_overrides

CPU = torch.device("cpu")
RBM_PRESETS = ("rbm-mnist-cd1", "rbm-mnist-cd3", "rbm-mnist-cd25", "rbm-mnist-pcd")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread avoids OpenMP barrier stalls on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg(preset, seed=0, **settings):
    over = parse_overrides([f"{k}={v}" for k, v in settings.items()])
    return presets.resolve(preset, over, seed=seed)


def test_rbm_smoke_cli_train_and_eval(tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    args = ["--data-dir", str(mnist_dir), "--device", "cpu", "--quiet"]
    assert main(["train", "--preset", "rbm-smoke", "--out", str(out), *args]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.safetensors", "summary.json"} <= names
    assert {"filters.png", "samples.png"} <= names
    s = json.loads((out / "summary.json").read_text())
    for key in (
        "test_logprob",
        "train_logprob",
        "log_z",
        "log_z_std",
        "log_z_exact",
        "test_logprob_exact",
        "train_logprob_exact",
        "wall_seconds",
    ):
        assert math.isfinite(s[key]), key
    assert s["binarize"] == "sample" and s["algorithm"] == "rbm" and s["n_hidden"] == 10
    assert s["ais_betas"] == 1000 and s["ais_chains"] == 100
    # log-probabilities of 784 binary pixels: negative, above the uniform model's
    assert -784 * math.log(2) < s["test_logprob"] < 0
    # AIS agrees with enumeration within its error bar (3 standard errors)
    assert abs(s["log_z"] - s["log_z_exact"]) <= 3 * s["log_z_std"] + 1e-3
    assert s["test_logprob"] - s["test_logprob_exact"] == pytest.approx(
        s["log_z_exact"] - s["log_z"], abs=1e-9
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["k"] == 1 for m in lines)
    assert lines[1]["loss"] < lines[0]["loss"] + 1.0  # reconstruction error does not blow up

    # eval re-reads the checkpoint and, with the same AIS seed, gets the same numbers
    assert main(["eval", str(out), *args]) == 0
    e = json.loads((out / "eval.json").read_text())
    for key in ("test_logprob", "log_z", "log_z_exact", "test_logprob_exact"):
        assert e[key] == pytest.approx(s[key], abs=1e-9), key
    assert e["epochs_done"] == 2
    printed = capsys.readouterr().out
    assert "test_logprob" in printed and "train_logprob" in printed and "samples.png" in printed


def test_rbm_run_rejects_grey_images(tmp_path, mnist_dir):
    config = cfg("rbm-smoke", **{"data.binarize": "none"})
    with pytest.raises(ConfigError, match="binary images"):
        runs.train(config, tmp_path / "r", device=CPU, data_dir=mnist_dir, progress=False)


def test_rbm_resume_equals_uninterrupted_with_pcd_and_momentum(tmp_path, mnist_dir):
    settings = {
        "train.epochs": 3,
        "train.persistent": "true",
        "train.momentum_switch_epoch": 1,
        "train.ais_betas": 100,
        "train.lr": 0.02,
    }
    full = cfg("rbm-smoke", **settings)
    s_full = runs.train(full, tmp_path / "full", device=CPU, data_dir=mnist_dir, progress=False)
    # the same run, stopped in its second epoch, then resumed to the end
    first = cfg("rbm-smoke", **settings)
    part = tmp_path / "part"
    train_interrupted(first, part, mnist_dir)
    tensors, meta = checkpoint.load(part / runs.CHECKPOINT)
    assert meta["epochs_done"] == 1
    # the checkpoint carries the persistent chains and the momentum velocities
    assert tensors["model.persistent_h"].shape == (100, 10)
    assert tensors["model.persistent_v"].shape == (100, 784)
    assert {"velocity.W", "velocity.b_v", "velocity.b_h"} <= tensors.keys()
    assert tensors["velocity.W"].abs().sum() > 0

    s_part = runs.train(None, part, device=CPU, data_dir=mnist_dir, progress=False, resume=True)
    assert_same_checkpoints(tmp_path / "full", part)
    for key in ("test_logprob", "log_z", "log_z_exact"):
        assert s_full[key] == s_part[key], key
    epochs = [json.loads(x)["epoch"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_bm_tiny_exact_log_likelihood_improves(tmp_path, mnist_dir):
    config = cfg("bm-tiny", **{"train.epochs": 3, "data.train_subset": 3000})
    initial = runs.build_experiment(config, str(mnist_dir), CPU).evaluate()
    s = runs.train(config, tmp_path / "bm", device=CPU, data_dir=mnist_dir, progress=False)
    for key in ("test_logprob_exact", "train_logprob_exact", "log_z_exact"):
        assert math.isfinite(s[key]), key
    assert s["n_visible"] == 16 and s["n_hidden"] == 4
    # the start is the independent-pixel model (b_v from the pixel means, W, L, J ~ 0.01);
    # lateral and hidden weights must capture correlations it cannot
    assert s["test_logprob_exact"] > initial["test_logprob_exact"] + 0.3
    assert s["train_logprob_exact"] > initial["train_logprob_exact"] + 0.3
    assert s["test_logprob_exact"] > s["uniform_logprob"] + 2.0
    lines = [json.loads(x) for x in (tmp_path / "bm" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == pytest.approx(-m["train_logprob_exact"]) for m in lines)


@pytest.mark.parametrize(
    ("n_visible", "n_hidden", "dtype"),
    [(30, 12, torch.float64), (9, 17, torch.float64), (40, 13, torch.float32), (5, 1, None)],
)
def test_enumerate_rbm_log_z_matches_exact(n_visible, n_hidden, dtype):
    g = torch.Generator().manual_seed(n_visible * 100 + n_hidden)
    rbm = RBM(n_visible, n_hidden)
    with torch.no_grad():
        rbm.W.normal_(0.0, 0.5, generator=g)
        rbm.b_v.normal_(0.0, 1.0, generator=g)
        rbm.b_h.normal_(0.0, 1.0, generator=g)
    got = enumerate_rbm_log_z(rbm.W, rbm.b_v, rbm.b_h, dtype=dtype)
    want = exact_log_z(rbm).item()
    assert got == pytest.approx(want, abs=1e-4 if dtype == torch.float32 else 1e-9)


def test_enumerate_rbm_log_z_refuses_too_many_units():
    rbm = RBM(40, 31)
    with pytest.raises(ValueError, match="cannot enumerate 31 units"):
        enumerate_rbm_log_z(rbm.W, rbm.b_v, rbm.b_h)


@pytest.mark.parametrize("config", [RBMTrainConfig, BMTrainConfig])
@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ({"epochs": 0}, "epochs and batch_size"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr_schedule": "cosine"}, "lr_schedule must be"),
        ({"momentum_final": 1.0}, "momentum_final must be in"),
        ({"momentum_switch_epoch": -1}, "momentum_switch_epoch"),
        ({"weight_decay": -1e-4}, "weight_decay"),
    ],
)
def test_train_configs_reject_bad_optimizer_settings(config, setting, needle):
    config()  # the defaults are valid
    with pytest.raises(ValueError, match=needle):
        config(**setting)


def test_k_schedule_ramps_linearly_then_stays():
    t = RBMTrainConfig(k=1, k_final=25, k_ramp_epochs=24)
    assert [t.k_at(e) for e in (0, 12, 24, 40)] == [1, 13, 25, 25]
    assert RBMTrainConfig(k=3).k_at(17) == 3
    assert RBMTrainConfig(k=2, k_final=5, k_ramp_epochs=0).k_at(0) == 5


def test_pool_binary_crops_and_thresholds():
    x = torch.zeros(2, 28 * 28)
    x.view(2, 28, 28)[0, 4:9, 4:9] = 1.0  # the top-left 5 x 5 block of the central 20 x 20
    out = pool_binary(x, (28, 28), 4, 0.3, crop=4)
    assert out.shape == (2, 16)
    assert out[0].tolist() == [1.0] + [0.0] * 15 and out[1].sum() == 0


def test_boltzmann_presets_resolve_with_documented_settings():
    for name in (*RBM_PRESETS, "rbm-mnist-h25", "bm-tiny", "rbm-smoke"):
        p = presets.get_preset(name)
        assert p.description and p.expected
        c = presets.resolve(name)
        assert c.algorithm == ("bm" if name == "bm-tiny" else "rbm")
    for name in (*RBM_PRESETS, "rbm-mnist-h25"):
        c = presets.resolve(name)
        assert c.data.binarize == "sample" and c.data.train_subset == 0
        assert c.train.ais_betas == 14500 and c.train.ais_chains == 100
        assert c.model.n_hidden == (25 if name == "rbm-mnist-h25" else 500)
    assert presets.resolve("rbm-mnist-cd25").train.k_at(49) == 25
    assert presets.resolve("rbm-mnist-pcd").train.persistent
