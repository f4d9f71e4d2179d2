"""The public surface: fflab.train on in-memory data, fflab.load_run, fflab.from_arrays.

Everything here runs on scikit-learn's digits (8 x 8 images, 10 classes, shipped with the
package), so it needs no download.
"""

import json

import numpy as np
import pytest
import torch
from run_helpers import assert_same_checkpoints, stop_at_second_checkpoint
from sklearn.datasets import load_digits

import fflab
from fflab import checkpoint, runs
from fflab.runs import RunError


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x, y = d.data / 16.0, d.target
    idx = np.random.default_rng(0).permutation(len(y))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


SMALL = {"model": {"hidden": [300, 300], "score_from": 0, "head_from": 0}}


def test_public_names_exist():
    for name in fflab.__all__:
        assert getattr(fflab, name) is not None, name


def test_ff_learns_digits_from_arrays(tmp_path, digits, one_thread):
    """Supervised FF on numpy arrays of 64 features: the label is concatenated, not written
    over the image (the MNIST preset's overlay would erase 10 of the 64 pixels).
    Measured: 3.0% (goodness) and 1.8% (softmax head) test error, about 4 s."""
    s = fflab.train(
        "mnist-ff-quick", tmp_path / "r", data=digits, settings={**SMALL, "train": {"epochs": 30}}
    )
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["data"]["dataset"] == "arrays"
    assert cfg["model"]["label_mode"] == "concat"
    assert cfg["model"]["in_features"] == 64 and cfg["model"]["num_classes"] == 10
    assert s["test_error_goodness"] < 6.0, s
    assert s["test_error_softmax"] < 4.0, s


def test_load_run_gives_the_trained_ff_net(tmp_path, digits, one_thread):
    s = fflab.train(
        "mnist-ff-quick", tmp_path / "r", data=digits, settings={**SMALL, "train": {"epochs": 2}}
    )
    net = fflab.load_run(tmp_path / "r")
    assert isinstance(net, fflab.FFNet) and not net.training
    x_test = torch.as_tensor(digits[2], dtype=torch.float32)
    y_test = torch.as_tensor(digits[3])
    for mode in ("goodness", "softmax"):
        wrong = int((net.predict(x_test, mode) != y_test).sum())
        assert wrong == round(s[f"test_error_{mode}"] * len(y_test) / 100)
    tensors, _ = checkpoint.load(tmp_path / "r" / runs.CHECKPOINT)
    assert torch.equal(net.running_mean(0), tensors["model.running_mean_0"])


@pytest.mark.parametrize(
    "preset,settings,cls",
    [
        ("mnist-bp-hinton-code", {"model": {"hidden": [20]}, "train": {"epochs": 1}}, "BPNet"),
        ("rbm-smoke", {"data": {"binarize": "threshold", "train_subset": 0}}, "RBM"),
    ],
)
def test_load_run_gives_every_algorithms_model(tmp_path, digits, one_thread, preset, settings, cls):
    fflab.train(preset, tmp_path / "r", data=digits, settings=settings)
    model = fflab.load_run(tmp_path / "r")
    assert type(model).__name__ == cls
    tensors, _ = checkpoint.load(tmp_path / "r" / runs.CHECKPOINT)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[f"model.{k}"]), k


def test_resume_on_arrays_is_exact_and_checks_the_data(tmp_path, digits, one_thread):
    settings = {**SMALL, "train": {"epochs": 3}}
    fflab.train("mnist-ff-quick", tmp_path / "full", data=digits, settings=settings)
    part = tmp_path / "part"
    with stop_at_second_checkpoint():
        fflab.train("mnist-ff-quick", part, data=digits, settings=settings)
    assert checkpoint.load(part / runs.CHECKPOINT)[1]["epochs_done"] == 1
    with pytest.raises(RunError, match="handed over in memory"):
        fflab.train("mnist-ff-quick", part, resume=True)
    other = (digits[0][::-1].copy(), digits[1][::-1].copy(), digits[2], digits[3])
    with pytest.raises(RunError, match="other data"):
        fflab.train("mnist-ff-quick", part, data=other, resume=True)
    fflab.train("mnist-ff-quick", part, data=digits, resume=True)
    assert_same_checkpoints(tmp_path / "full", part)


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros(5), np.zeros(5), np.zeros((2, 3)), [0, 1]), "samples, features"),
        ((np.zeros((5, 3)), [0, 1, 2], np.zeros((2, 3)), [0, 1]), "3 labels for 5 samples"),
        ((np.full((2, 3), np.inf), [0, 1], np.zeros((2, 3)), [0, 1]), "NaN or infinite"),
        ((np.zeros((2, 3)), [0, 1.5], np.zeros((2, 3)), [0, 1]), "integer class labels"),
        ((np.zeros((2, 3)), [0, -1], np.zeros((2, 3)), [0, 1]), "integer class labels"),
        ((np.zeros((2, 3)), [0, 1], np.zeros((2, 4)), [0, 1]), "different numbers of features"),
        ((np.zeros((2, 3)), [0, 0], np.zeros((2, 3)), [0, 0]), "at least 2 classes"),
    ],
)
def test_bad_arrays_are_one_line_errors(args, match):
    with pytest.raises(ValueError, match=match):
        fflab.from_arrays(*args)


def test_from_arrays_keeps_values_and_takes_tensors():
    x = np.arange(12, dtype=np.float64).reshape(3, 2, 2)
    ds = fflab.from_arrays(x, np.array([0, 2, 1]), torch.ones(1, 4), torch.tensor([1]))
    assert ds.train.x.dtype == torch.float32 and ds.train.x.shape == (3, 4)
    assert torch.equal(ds.train.x, torch.arange(12.0).reshape(3, 4))  # flattened, not rescaled
    assert ds.num_classes == 3 and ds.validation is None
    with pytest.raises(ValueError, match="image_shape"):
        fflab.from_arrays(x, [0, 1, 2], x, [0, 1, 2], image_shape=(3, 3))


def test_tensorboard_scalars_equal_the_metrics_and_survive_resume(tmp_path, digits, one_thread):
    """Also when the event log is lost: the resumed run rebuilds it from metrics.jsonl."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = {**SMALL, "train": {"epochs": 3}}
    part = tmp_path / "part"
    with stop_at_second_checkpoint():
        fflab.train("mnist-ff-quick", part, data=digits, settings=settings, tensorboard=True)
    shutil.rmtree(part / "tensorboard")
    fflab.train("mnist-ff-quick", part, data=digits, resume=True, tensorboard=True)
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(part / "tensorboard"))
    acc.Reload()
    tags = {
        "loss": "loss/total",
        "goodness_pos_1": "goodness/layer1/positive",
        "dead_0": "units/dead_layer0",
        "samples_per_second": "speed/samples_per_second",
    }
    for key, tag in tags.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
