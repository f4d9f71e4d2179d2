"""The command line: exit codes and one-line errors, no tracebacks, nothing half-written."""

import json
import subprocess
import sys

import pytest
import torch


def fflab(*args, cwd=None):
    r = subprocess.run(
        [sys.executable, "-m", "fflab.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
    return r.returncode, r.stdout, r.stderr


def train_smoke(out, data_dir, *extra):
    """``fflab train --preset smoke`` into ``out`` with data from ``data_dir``."""
    return fflab("train", "--preset", "smoke", "--out", out, "--data-dir", data_dir, *extra)


def one_line_error(err):
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_presets_lists_every_preset_with_expectation():
    code, out, _ = fflab("presets")
    assert code == 0
    for name in ("mnist-ff", "mnist-ff-hinton-code", "mnist-ff-quick", "smoke"):
        assert name in out
    assert out.count("expected:") >= 4


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "smoke", "--set", "train.bogus=1"], "unknown setting train.bogus"),
        (["train", "--preset", "smoke", "--set", "train.epochs=two"], "expected int"),
        (["train", "--preset", "smoke", "--set", "lr"], "section.key=value"),
        (["train", "--preset", "smoke", "--set", "model.goodness=l1"], "goodness must be"),
        (["train"], "needs --preset"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, needle):
    code, _, err = fflab(*args, "--out", tmp_path / "r") if args[0] == "train" else fflab(*args)
    assert code == 2
    assert needle in one_line_error(err)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_usage_error(tmp_path, mnist_dir):
    code, _, err = train_smoke(tmp_path / "r", mnist_dir, "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in one_line_error(err)
    assert not (tmp_path / "r").exists()


def test_missing_data_is_a_runtime_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FFLAB_DATA", raising=False)  # it would be searched after --data-dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FFLAB_MIRRORS", "http://127.0.0.1:9/")
    (tmp_path / "empty").mkdir()
    code, _, err = train_smoke(tmp_path / "r", tmp_path / "empty", "--quiet")
    line = one_line_error(err)
    assert code == 1 and "train-images-idx3-ubyte.gz" in line and "--data-dir" in line
    assert not (tmp_path / "r").exists()
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_train_eval_and_resume_refusals(tmp_path, mnist_dir):
    out = tmp_path / "r"
    code, stdout, err = train_smoke(out, mnist_dir, "--epochs", "1")
    assert code == 0, err
    assert "test_error_goodness" in stdout and "test_error_softmax" in stdout
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, err = fflab("eval", out, "--data-dir", mnist_dir, "--quiet")
    assert code == 0, err
    assert f"{summary['test_error_goodness']:.4f}" in stdout
    code, _, err = train_smoke(out, mnist_dir)
    assert code == 1 and "already holds a run" in one_line_error(err)
    code, _, err = fflab("train", "--resume", out, "--preset", "smoke")
    assert code == 2 and "--resume takes the run's own config" in one_line_error(err)
    code, _, err = fflab("eval", tmp_path / "nowhere")
    assert code == 1 and "not a run directory" in one_line_error(err)


def test_corrupt_checkpoint_is_a_runtime_error(tmp_path, mnist_dir):
    out = tmp_path / "r"
    assert train_smoke(out, mnist_dir, "--epochs", "1", "--quiet")[0] == 0
    (out / "checkpoint.safetensors").write_bytes(b"\0" * 100)
    code, _, err = fflab("eval", out, "--data-dir", mnist_dir)
    assert code == 1 and "unreadable" in one_line_error(err)


def test_diverging_run_exits_1_and_keeps_checkpoint(tmp_path, mnist_dir):
    out = tmp_path / "r"
    code, _, err = train_smoke(
        out, mnist_dir, "--set", "train.lr=1e30", "--set", "train.lr_schedule=constant", "--quiet"
    )
    assert code == 1 and "diverged in epoch 1" in one_line_error(err)
    assert not (out / "checkpoint.safetensors").exists()  # no epoch completed: nothing to keep
    assert not (out / "summary.json").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def _fake_run(d, preset, rows):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"preset": preset}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_plot_time_to_accuracy_table_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    # 30 s epochs; the evaluation time in wall_seconds must not count
    rows = [
        {"epoch": i + 1, "seconds": 30.0, "wall_seconds": 100.0 * (i + 1), "test_error_goodness": e}
        for i, e in enumerate([3.0, 1.9, 1.45, 1.5, 1.38])
    ]
    a = _fake_run(tmp_path / "a", "mnist-ff-quick", rows)
    b = _fake_run(tmp_path / "b", "mnist-ff", rows[:2])
    png = tmp_path / "t.png"
    code, out, err = fflab("plot", a, b, "--out", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line_a = next(x for x in out.splitlines() if x.startswith(str(a)))
    # <= 2.0% after epoch 2 (1.0 min), <= 1.5% after epoch 3 (1.5 min), <= 1.4% at epoch 5
    assert line_a.split()[1:] == ["5", "1.38%", "1.0", "min", "1.5", "min", "2.5", "min"]
    line_b = next(x for x in out.splitlines() if x.startswith(str(b)))
    assert line_b.split()[1:] == ["2", "1.90%", "1.0", "min", "never", "never"]


def test_plot_without_logged_test_error_is_a_usage_error(tmp_path):
    a = _fake_run(tmp_path / "a", "smoke", [{"epoch": 1, "seconds": 3.0, "loss": 1.0}])
    code, _, err = fflab("plot", a, "--out", tmp_path / "t.png")
    assert code == 2 and "log_test_error=true" in one_line_error(err)
    assert not (tmp_path / "t.png").exists()
