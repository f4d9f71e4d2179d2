"""The ff-vs-bm study end to end on scikit-learn's digits (no download), on tiny settings."""

import json

import pytest

from fflab.studies import StudyContext, run_study
from fflab.studies.ff_vs_bm import CLASSIFIERS, PUBLISHED


@pytest.fixture(scope="module")
def digits(study_digits):
    return study_digits


def test_ff_vs_bm_study_on_digits(tmp_path, digits, one_thread):
    out_dir = tmp_path / "ff-vs-bm"
    ctx = StudyContext(
        out_dir=out_dir,
        quick=True,
        data=digits,
        # one set of settings sizes every net: hidden for FF and backprop, n_hidden for RBMs
        settings={
            "model": {"hidden": [60, 60], "n_hidden": 60},
            "train": {"epochs": 8},
            "data": {"eval_batch_size": 500},
        },
    )
    out = run_study("ff-vs-bm", ctx)
    runs = out["runs"]
    assert set(runs) == {*CLASSIFIERS, "ff-unsupervised"}
    for name, r in runs.items():
        summary = json.loads((out_dir / name / "summary.json").read_text())
        assert r["test_error"] == summary[r["error_kind"]]
        assert 0 <= r["test_error"] <= 100, (name, r)
        assert r["epochs"] == 8 and r["train_seconds_per_sample"] > 0
        assert r["median_epoch_seconds_per_sample"] > 0 and r["run_cost_vs_ff"] > 0
        assert r["hidden"] == ([60] if name.startswith("rbm") else [60, 60])
    assert runs["ff"]["train_cost_vs_ff"] == 1.0 and runs["ff"]["test_cost_vs_ff"] == 1.0
    assert out["timing"] == {"images": 3000, "rounds": 3}
    assert {runs[n]["objective"] for n in runs if n.startswith("rbm")} == {
        "discriminative", "hybrid", "generative"
    }  # fmt: skip
    probes = out["probe"]
    assert len(probes) == 1 + 1 + 1 + 3 * 2 + 1  # ff, bp, unsup, 3 RBMs x 2, pixels
    assert probes["rbm-hybrid: p(h|v), y summed out"]["width"] == 60
    assert probes["ff: all hidden layers"]["width"] == 120
    assert probes["pixels"]["width"] == 64
    # the probe on the pixels of 8 x 8 digits: a linear classifier, well under 20% error
    assert probes["pixels"]["test_error"] < 20
    assert all(0 <= p["test_error"] <= 100 for p in probes.values())
    assert [p["test_error"] for p in out["published"]] == [e for *_, e in PUBLISHED]
    report = (out_dir / "report.md").read_text()
    assert "## Answer" in report and "Larochelle & Bengio" in report and "1.81%" in report
    for png in ("errors.png", "probe_cost.png"):
        assert (out_dir / png).stat().st_size > 5000
    assert json.loads((out_dir / "results.json").read_text())["study"] == "ff-vs-bm"
    # a second call reuses the finished runs (no training) and gives the same errors
    again = run_study("ff-vs-bm", ctx)
    assert {n: r["test_error"] for n, r in again["runs"].items()} == {
        n: r["test_error"] for n, r in runs.items()
    }
