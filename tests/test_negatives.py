"""Negative sources: correctness and sampling distributions."""

import math

import torch

from fflab.negatives import blur_mask, hard_wrong_labels, hybrid_images, random_wrong_labels


def test_random_wrong_labels_never_true_and_uniform():
    g = torch.Generator().manual_seed(0)
    n = 60000
    y = torch.randint(0, 10, (n,), generator=g)
    neg = random_wrong_labels(y, 10, g)
    assert not bool((neg == y).any())
    # for true label 3, the other nine classes are equally likely
    counts = torch.bincount(neg[y == 3], minlength=10).double()
    m = counts.sum()
    assert counts[3] == 0
    p = 1 / 9
    se = math.sqrt(m * p * (1 - p))
    assert ((counts[torch.arange(10) != 3] - m * p).abs() < 5 * se).all()


def test_hard_negatives_follow_head_probabilities():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]])
    y = torch.tensor([0, 3])
    n = 40000
    labels = y.repeat(n)
    neg = hard_wrong_labels(labels, probs.repeat(n, 1), g)
    assert not bool((neg == labels).any())
    for row in range(2):
        got = torch.bincount(neg[row::2], minlength=4).double() / n
        want = probs[row].double().clone()
        want[y[row]] = 0
        want /= want.sum()
        se = (want * (1 - want) / n).sqrt()
        assert ((got - want).abs() <= 5 * se + 1e-9).all(), (got, want)


def test_hard_negatives_reach_every_wrong_class_when_head_is_certain():
    g = torch.Generator().manual_seed(2)
    probs = torch.tensor([[1.0, 0.0, 0.0]]).repeat(3000, 1)
    neg = hard_wrong_labels(torch.zeros(3000, dtype=torch.long), probs, g)
    assert set(neg.tolist()) == {1, 2}


def test_hybrid_images_mix_two_images_with_blurred_mask():
    g = torch.Generator().manual_seed(3)
    m = blur_mask((4, 28, 28), g)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0.2 < m.mean() < 0.8  # large regions of both
    x = torch.rand(5, 784, generator=g)
    h = hybrid_images(x, (28, 28), g)
    same_a = torch.isclose(h, x)
    other = torch.stack([torch.isclose(h, torch.roll(x, s, 0)) for s in range(1, 5)])
    assert bool((same_a | other.any(0)).all())
    assert 0.1 < same_a.float().mean() < 0.9


def test_hard_labels_survive_non_finite_probabilities():
    """A diverging head gives NaN or inf probabilities: still wrong labels, no error."""
    from fflab.negatives import hard_wrong_labels

    probs = torch.tensor([[float("nan")] * 4, [float("inf"), 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    y = torch.tensor([0, 1, 3])
    got = hard_wrong_labels(y, probs, torch.Generator().manual_seed(0))
    assert got.shape == (3,) and bool((got != y).all()) and bool(((got >= 0) & (got < 4)).all())
