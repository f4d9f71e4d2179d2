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


def train_digits(out, *extra):
    """``fflab train --preset digits-ff`` into ``out``: scikit-learn's digits, no download."""
    return fflab("train", "--preset", "digits-ff", "--out", out, *extra)


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
def test_cuda_without_gpu_is_a_usage_error(tmp_path):
    code, _, err = train_digits(tmp_path / "r", "--device", "cuda")
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


def test_train_eval_and_resume_refusals(tmp_path):
    out = tmp_path / "r"
    code, stdout, err = train_digits(out, "--epochs", "3")
    assert code == 0, err
    assert "test_error_goodness" in stdout and "test_error_softmax" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_error_goodness"] < 50.0  # 3 epochs on digits; chance is 90%
    code, stdout, err = fflab("eval", out, "--quiet")
    assert code == 0, err
    assert f"{summary['test_error_goodness']:.4f}" in stdout
    code, _, err = train_digits(out)
    assert code == 1 and "already holds a run" in one_line_error(err)
    code, _, err = fflab("train", "--resume", out, "--preset", "digits-ff")
    assert code == 2 and "--resume takes the run's own config" in one_line_error(err)
    code, _, err = fflab("eval", tmp_path / "nowhere")
    assert code == 1 and "not a run directory" in one_line_error(err)


def test_interrupted_cli_run_resumes_to_the_uninterrupted_result(tmp_path):
    """A run stopped by SIGINT after its first checkpoint continues with --resume and ends
    with the weights of a run that was never stopped."""
    import signal
    import time

    from run_helpers import assert_same_checkpoints

    full = tmp_path / "full"
    assert train_digits(full, "--epochs", "4", "--quiet")[0] == 0
    part = tmp_path / "part"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fflab", "train", "--preset", "digits-ff", "--out", str(part),
         "--epochs", "4", "--quiet"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (part / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130 and "train --resume" in one_line_error(err)
    code, _, err = fflab("train", "--resume", part, "--quiet")
    assert code == 0, err
    assert_same_checkpoints(full, part)


def test_corrupt_checkpoint_is_a_runtime_error(tmp_path):
    out = tmp_path / "r"
    assert train_digits(out, "--epochs", "1", "--quiet")[0] == 0
    (out / "checkpoint.safetensors").write_bytes(b"\0" * 100)
    code, _, err = fflab("eval", out)
    assert code == 1 and "unreadable" in one_line_error(err)


def test_diverging_run_exits_1_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "r"
    code, _, err = train_digits(
        out, "--set", "train.lr=1e30", "--set", "train.lr_schedule=constant", "--quiet"
    )
    assert code == 1 and "diverged in epoch 1" in one_line_error(err)
    assert not (out / "checkpoint.safetensors").exists()  # no epoch completed: nothing to keep
    assert not (out / "summary.json").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_smoke_preset_on_mnist(tmp_path, mnist_dir):
    """The MNIST plumbing: the smoke preset trains and evaluates from the IDX files."""
    out = tmp_path / "r"
    code, stdout, err = train_smoke(out, mnist_dir, "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_error_softmax"] < 50.0  # measured 37%; chance is 90%


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
