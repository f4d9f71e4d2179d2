"""The permuted and unmasked negative sources (exact properties, sampling distributions, the
trainer's config and autograd reference, resume) and the negatives study end to end on
scikit-learn's digits."""

import itertools
import json
import math

import pytest
import torch
from run_helpers import assert_same_checkpoints, stop_at_second_checkpoint

import fflab
from fflab import checkpoint, runs
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.reference import ReferenceTrainer
from fflab.ff.train import FFTrainConfig, FFTrainer, negative_source
from fflab.negatives import (
    NEGATIVE_SOURCES,
    PermutedImages,
    UnmaskedImages,
    make_source,
    other_images,
    permuted_pixels,
)
from fflab.studies import StudyContext, run_study
from fflab.studies.negatives import error_curve


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- permuted ------------------------------------------------------------------------------------
def test_permuted_rows_are_permutations_of_their_own_pixels():
    x = torch.rand(50, 64, generator=_gen(0), dtype=torch.float64)
    before = x.clone()
    p = permuted_pixels(x, _gen(1))
    assert p.shape == x.shape and p.dtype == torch.float64
    assert torch.equal(x, before)  # the input is not changed
    assert torch.equal(p.sort(1).values, x.sort(1).values)  # same values, row by row
    assert not torch.equal(p, x)
    # the identity image 0..D-1 shows each row's permutation: every row has its own
    ident = torch.arange(64.0).repeat(50, 1)
    perms = permuted_pixels(ident, _gen(2)).long()
    assert torch.equal(perms.sort(1).values, ident.long())
    assert len({tuple(r) for r in perms.tolist()}) == 50


def test_permuted_is_deterministic_under_a_seeded_generator():
    x = torch.rand(8, 30, generator=_gen(0))
    assert torch.equal(permuted_pixels(x, _gen(5)), permuted_pixels(x, _gen(5)))
    assert not torch.equal(permuted_pixels(x, _gen(5)), permuted_pixels(x, _gen(6)))
    g = _gen(5)
    first, second = permuted_pixels(x, g), permuted_pixels(x, g)
    assert not torch.equal(first, second)  # the generator moves on between draws


def test_permutations_are_uniform():
    """Each of the 4! = 24 permutations of 4 pixels comes up 1/24 of the time."""
    n = 48000
    perms = permuted_pixels(torch.arange(4.0).repeat(n, 1), _gen(3)).long()
    index = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = torch.bincount(torch.tensor([index[tuple(r)] for r in perms.tolist()]), minlength=24)
    p = 1 / 24
    se = math.sqrt(n * p * (1 - p))
    assert ((counts.double() - n * p).abs() < 5 * se).all(), counts


# -- unmasked ------------------------------------------------------------------------------------
def test_unmasked_gives_another_real_image_of_the_batch_never_itself():
    x = torch.rand(12, 20, generator=_gen(0), dtype=torch.float64)  # distinct rows
    for seed in range(20):
        o = other_images(x, _gen(seed))
        assert o.shape == x.shape and o.dtype == x.dtype
        match = (o.unsqueeze(1) == x.unsqueeze(0)).all(2)  # (B, B): o[i] equals x[j]
        assert torch.equal(match.sum(1), torch.ones(12, dtype=torch.long))  # one real image
        assert not bool(match.diagonal().any())  # never the image itself


def test_unmasked_partner_is_uniform_over_the_others_and_of_another_class_on_request():
    b, n = 5, 20000
    x = torch.arange(float(b)).unsqueeze(1)  # row i holds the value i
    g = _gen(1)
    picks = torch.cat([other_images(x, g).squeeze(1).long() for _ in range(n // b)])
    rows = torch.arange(b).repeat(n // b)
    counts = torch.bincount(picks[rows == 0], minlength=b).double()
    m, p = counts.sum(), 1 / (b - 1)
    assert counts[0] == 0
    assert ((counts[1:] - m * p).abs() < 5 * math.sqrt(m * p * (1 - p))).all(), counts
    y = torch.tensor([0, 0, 1, 1, 2])
    for seed in range(20):
        o = other_images(x, _gen(seed), y, different_class=True).squeeze(1).long()
        assert not bool((y[o] == y).any())
    with pytest.raises(ValueError, match="needs the labels"):
        other_images(x, g, None, different_class=True)


# -- registry, config, trainer -------------------------------------------------------------------
def test_new_sources_are_registered_unlabelled_and_built_from_the_trainers_options():
    assert NEGATIVE_SOURCES["permuted"] is PermutedImages
    assert NEGATIVE_SOURCES["unmasked"] is UnmaskedImages
    assert not PermutedImages.labelled and not UnmaskedImages.labelled
    assert not PermutedImages.needs_probs and not UnmaskedImages.needs_probs
    opts = {"image_shape": (4, 5), "blurs": 6, "different_class": False}
    assert isinstance(make_source("permuted", **opts), PermutedImages)
    assert isinstance(make_source("unmasked", **opts), UnmaskedImages)
    with pytest.raises(ValueError, match="no second image"):
        make_source("permuted", **{**opts, "different_class": True})
    x, y = torch.rand(6, 20, generator=_gen(0)), torch.arange(6) % 3
    neg = make_source("unmasked", **{**opts, "different_class": True}).draw(x, y, _gen(1))
    assert neg.y is None and neg.x.shape == x.shape


def net_for(mode="none", seed=0, peer=0.0):
    cfg = FFNetConfig(
        in_features=20,
        num_classes=4,
        hidden=(7, 6, 5),
        label_mode=mode,
        image_shape=(1, 4, 5) if mode == "none" else (),
        peer_norm=peer,
    )
    return FFNet(cfg, generator=_gen(seed)).double()


@pytest.mark.parametrize("negatives", ["permuted", "unmasked"])
def test_sources_selected_by_config_match_the_autograd_reference(negatives):
    cfg = FFTrainConfig(negatives=negatives, weight_cost=0.01)
    assert type(negative_source(net_for(), cfg)) is NEGATIVE_SOURCES[negatives]
    with pytest.raises(ValueError, match="label_mode=none"):
        negative_source(net_for("overlay"), cfg)
    x = torch.rand(9, 20, generator=_gen(1), dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=_gen(2))
    fast, ref = FFTrainer(net_for(peer=0.06), cfg), ReferenceTrainer(net_for(peer=0.06), cfg)
    for seed in range(3):
        s_fast = fast.step(x, y, _gen(seed))
        s_ref = ref.step(x, y, _gen(seed))
        torch.testing.assert_close(s_fast, s_ref, rtol=0, atol=1e-12)
    for a, b in zip(fast.net.parameters(), ref.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the negative phase's goodness is the source's: the same rows drawn by hand
    g = _gen(7)
    want = permuted_pixels(x, g) if negatives == "permuted" else other_images(x, g, y)
    got = make_source(negatives, image_shape=(4, 5)).draw(x, y, _gen(7)).x
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def digits(study_digits):
    return study_digits


TINY = {"model": {"hidden": [40, 40]}, "train": {"epochs": 3, "probe_epochs": 2, "lr": 0.02}}


@pytest.mark.parametrize("negatives", ["permuted", "unmasked"])
def test_resumed_run_equals_uninterrupted(tmp_path, digits, one_thread, negatives):
    settings = {**TINY, "train": {**TINY["train"], "negatives": negatives}}
    fflab.train("mnist-ff-unsup-quick", tmp_path / "full", data=digits, settings=settings)
    part = tmp_path / "part"
    with stop_at_second_checkpoint():
        fflab.train("mnist-ff-unsup-quick", part, data=digits, settings=settings)
    assert checkpoint.load(part / runs.CHECKPOINT)[1]["epochs_done"] == 1
    fflab.train("mnist-ff-unsup-quick", part, data=digits, resume=True)
    assert_same_checkpoints(tmp_path / "full", part)


# -- the study -----------------------------------------------------------------------------------
def test_error_curve_by_hand():
    rows = [
        {"epoch": 1, "seconds": 2.0, "e": 9.0},
        {"epoch": 2, "seconds": 3.0},
        {"epoch": 3, "seconds": 1.5, "e": 4.0},
    ]
    assert error_curve(rows, "e") == {"epoch": [1, 3], "error": [9.0, 4.0], "seconds": [2.0, 6.5]}


def test_negatives_study_on_digits(tmp_path, digits, one_thread):
    ctx = StudyContext(
        out_dir=tmp_path / "neg",
        quick=True,
        data=digits,
        image_shape=(8, 8),
        settings={
            "model": {"hidden": [40, 40]},
            "train": {"epochs": 2, "probe_epochs": 2, "lr": 0.02},
            "data": {"eval_batch_size": 500},
        },
    )
    out = run_study("negatives", ctx)
    names = {"supervised-random", "supervised-hard", "unsupervised-permuted"}
    names |= {"unsupervised-unmasked"} | {f"unsupervised-hybrid-blurs{b}" for b in (1, 3, 6, 12)}
    assert set(out["runs"]) == names
    for name, r in out["runs"].items():
        cfg = json.loads((tmp_path / "neg" / name / "config.json").read_text())
        assert cfg["train"]["negatives"] == r["negatives"] == name.split("-")[1]
        assert cfg["train"]["log_test_error"]
        c = r["curve"]
        assert c["epoch"] == [1, 2] and all(0 <= e <= 100 for e in c["error"])
        assert 0 < c["seconds"][0] < c["seconds"][1]
        assert c["error"][-1] == pytest.approx(r["test_error"])  # last epoch = the summary
        assert r["n_test"] == 397 and r["time_ratio"] > 0
    assert out["runs"]["unsupervised-hybrid-blurs3"]["blurs"] == 3
    cfg = json.loads((tmp_path / "neg" / "unsupervised-hybrid-blurs12" / "config.json").read_text())
    assert cfg["train"]["blurs"] == 12
    assert out["runs"]["supervised-random"]["time_ratio"] == 1.0
    # permuted pixels are an easy negative: positives and negatives far apart within two
    # epochs (measured: last-layer G+ 60, G- 23); unmasked ones come from the positives'
    # distribution, so both phases keep one goodness (measured: 39.9 and 39.9, theta 40)
    perm, same = out["runs"]["unsupervised-permuted"], out["runs"]["unsupervised-unmasked"]
    assert perm["goodness_pos"][-1] > 1.5 * perm["goodness_neg"][-1]
    assert abs(same["goodness_pos"][-1] - same["goodness_neg"][-1]) < 0.05 * same["theta"]
    assert same["theta"] == 40
    u = out["untrained"]
    assert 0 <= u["test_error"] <= 100 and u["n_test"] == 397
    assert len(u["test_error_probe_layers"]) == 2  # one per hidden layer
    assert json.loads((tmp_path / "neg" / "untrained.json").read_text()) == u
    costs = out["draw_costs"]
    assert set(costs["step"]) == {"supervised", "unsupervised"} and costs["batch_size"] == 100
    assert set(costs["draw_over_step"]) == names
    assert all(v > 0 for v in costs["draw_over_step"].values())
    report = (tmp_path / "neg" / "report.md").read_text()
    assert "## Answer" in report and "| unsupervised-unmasked | unmasked |" in report
    for png in ("error_vs_epoch.png", "error_vs_time.png"):
        assert (tmp_path / "neg" / png).stat().st_size > 5000
    assert json.loads((tmp_path / "neg" / "results.json").read_text())["study"] == "negatives"
    again = run_study("negatives", ctx)  # reuses the finished runs
    assert again["runs"]["supervised-hard"]["curve"] == out["runs"]["supervised-hard"]["curve"]
