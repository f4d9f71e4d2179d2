"""Studies: their measures against hand-computed values and known distributions, and the
goodness study end to end on scikit-learn's digits (no download)."""

import json

import pytest
import torch

from fflab.studies import STUDIES, StudyContext, describe, run_study
from fflab.studies.metrics import (
    area_under_risk_coverage,
    expected_calibration_error,
    mean_overconfidence,
    reliability,
    risk_at_coverage,
    risk_coverage,
)


def test_reliability_and_ece_by_hand():
    p = torch.tensor([0.05, 0.15, 0.95, 0.95, 1.0])
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    mean_p, frac, count = reliability(p, t, bins=10)
    assert count.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2 + 1]  # p = 1 goes to the last bin
    assert mean_p[0] == pytest.approx(0.05) and frac[0] == 0.0
    assert mean_p[9] == pytest.approx((0.95 + 0.95 + 1.0) / 3) and frac[9] == pytest.approx(2 / 3)
    assert torch.isnan(mean_p[2]) and torch.isnan(frac[2])
    # |0 - .05| * 1 + |1 - .15| * 1 + |2/3 - .9667| * 3, over 5
    want = (0.05 + 0.85 + abs(2 / 3 - 2.9 / 3) * 3) / 5
    assert expected_calibration_error(p, t) == pytest.approx(want)


def test_calibrated_and_overconfident_predictors_are_told_apart():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200_000, generator=g, dtype=torch.float64)
    t = torch.bernoulli(p, generator=g)  # outcomes drawn with the predicted probability
    assert expected_calibration_error(p, t) < 0.005
    assert abs(mean_overconfidence(p, t)) < 0.005
    q = 0.5 + 0.5 * (p - 0.5)  # the truth is half as extreme as p says
    t2 = torch.bernoulli(q, generator=g)
    assert expected_calibration_error(p, t2) == pytest.approx(0.125, abs=0.01)
    assert mean_overconfidence(p, t2) == pytest.approx(0.125, abs=0.01)
    assert mean_overconfidence(q, torch.bernoulli(p, generator=g)) < -0.1  # under-confident


def test_risk_coverage_by_hand():
    conf = torch.tensor([0.9, 0.1, 0.5, 0.5])
    correct = torch.tensor([True, False, False, True])
    cov, risk = risk_coverage(conf, correct)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    # order: 0.9 (right), 0.5 (wrong, first of the tie), 0.5 (right), 0.1 (wrong)
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert area_under_risk_coverage(conf, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    assert risk_at_coverage(conf, correct, 0.5) == pytest.approx(0.5)


def test_every_study_is_listed_with_a_description():
    d = describe()
    assert set(d) == set(STUDIES) and all(len(v) > 20 for v in d.values())
    with pytest.raises(ValueError, match="unknown study"):
        run_study("nope", StudyContext(out_dir=None))


@pytest.fixture(scope="module")
def digits(study_digits):
    return study_digits


def test_goodness_study_on_digits(tmp_path, digits, one_thread):
    ctx = StudyContext(
        out_dir=tmp_path / "goodness",
        quick=True,
        data=digits,
        settings={
            "model": {"hidden": [100, 100, 100]},
            "train": {"epochs": 30, "lr": 0.02},
            "data": {"eval_batch_size": 500},
        },
    )
    out = run_study("goodness", ctx)
    assert set(out["runs"]) == {
        "supervised-theta0.5",
        "supervised-theta1",
        "supervised-theta2",
        "unsupervised",
    }
    sup = out["runs"]["supervised-theta1"]
    assert sup["theta"] == [100.0, 100.0, 100.0]
    assert out["runs"]["supervised-theta2"]["theta"] == [200.0] * 3
    for layer in sup["layers"]:
        for cal in layer.values():
            assert 0 <= cal["ece"] <= 1 and sum(cal["bins"]["count"]) == 2 * 397
    conf = sup["confidence"]["goodness_margin"]
    assert conf["error_at_80"] <= conf["error"] + 1e-9  # refusing the least sure never hurts here
    assert len(sup["layer_ranges"]) == 6  # 0..0, 0..1, 0..2, 1..1, 1..2, 2..2
    # the study's error for the scorer's own layers equals the net's goodness-scoring error
    summary = json.loads((tmp_path / "goodness" / "supervised-theta1" / "summary.json").read_text())
    own = next(r for r in sup["layer_ranges"] if (r["first"], r["last"]) == (1, 2))
    assert own["error"] == pytest.approx(summary["test_error_goodness"])
    assert conf["error"] == pytest.approx(summary["test_error_goodness"])
    report = (tmp_path / "goodness" / "report.md").read_text()
    assert "## Answer" in report and "| supervised-theta1 | 0 | random_wrong |" in report
    for png in ("reliability.png", "risk_coverage.png"):
        assert (tmp_path / "goodness" / png).stat().st_size > 5000
    assert json.loads((tmp_path / "goodness" / "results.json").read_text())["study"] == "goodness"
    # a second call reuses the finished runs (no training) and gives the same numbers
    again = run_study("goodness", ctx)
    assert again["runs"]["supervised-theta1"]["layer_ranges"] == sup["layer_ranges"]


def test_study_command_lists_and_rejects_with_exit_2():
    import subprocess
    import sys

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "fflab", "study", *args], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        return r.returncode, r.stdout, r.stderr

    code, out, _ = cli("--list")
    assert code == 0 and all(name in out for name in STUDIES)
    for args, needle in ((["nope"], "unknown study"), ([], "needs a NAME")):
        code, _, err = cli(*args)
        assert code == 2 and needle in err and "Traceback" not in err


def test_dead_units_study_on_digits(tmp_path, digits, one_thread):
    ctx = StudyContext(
        out_dir=tmp_path / "dead",
        quick=True,
        data=digits,
        settings={"model": {"hidden": [60, 60]}, "train": {"epochs": 3}},
    )
    out = run_study("dead-units", ctx)
    assert len(out["runs"]) == 7
    for name, r in out["runs"].items():
        metrics = (tmp_path / "dead" / name / "metrics.jsonl").read_text().splitlines()
        assert len(r["dead"]) == 2 and len(r["dead"][0]) == len(metrics) == 3
        assert all(0 <= v <= 1 for d in r["dead"] + r["always_on"] for v in d)
        assert r["error_kind"] == (
            "test_error_goodness" if "sup" in name[:3] else "test_error_probe"
        )
    report = (tmp_path / "dead" / "report.md").read_text()
    assert "## Answer" in report and "supervised-peer0.06" in report
    assert (tmp_path / "dead" / "units.png").stat().st_size > 5000


def test_standard_error_by_hand():
    from fflab.studies import standard_error

    assert standard_error(2.0, 10_000) == pytest.approx(100 * (0.02 * 0.98 / 10_000) ** 0.5)
    assert standard_error(0.0, 10) == 0.0


def test_a_study_trains_a_changed_preset_at_its_documented_settings(tmp_path, monkeypatch):
    """RECIPES sit under the study's own settings, which sit under the context's."""
    import fflab

    seen = {}
    monkeypatch.setattr(fflab, "train", lambda preset, run_dir, **kw: seen.update(kw))
    ctx = StudyContext(out_dir=tmp_path, settings={"train": {"epochs": 2}})
    ctx.train("u", "mnist-ff-unsup-quick", {"train": {"epochs": 5, "probe_epochs": 3}})
    assert seen["settings"]["train"] == {"lr": 0.005, "epochs": 2, "probe_epochs": 3}
    ctx.train("v", "mnist-ff-unsup-quick", {"train": {"lr": 0.02}})
    assert seen["settings"]["train"] == {"lr": 0.02, "epochs": 2}
    ctx.train("w", "mnist-ff-quick", {"train": {"epochs": 5}})
    assert seen["settings"]["train"] == {"epochs": 2}
