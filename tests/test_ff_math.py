"""FF math against hand-computed values and float64 autograd."""

import math

import pytest
import torch
import torch.nn.functional as F

from fflab.ff.functional import (
    dloss_dz,
    dropout_mask,
    embed_label,
    ff_loss,
    goodness,
    goodness_loss_terms,
    label_rows,
    peer_norm_dz,
    positive_logit,
    rms_normalize,
)


def sp(x):
    return math.log1p(math.exp(x))


def test_goodness_hand_values():
    a = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    assert goodness(a, "sumsq").tolist() == [5.0, 9.0]
    assert goodness(a, "meansq").tolist() == [2.5, 4.5]
    assert goodness(a, "minssq").tolist() == [5.0, 9.0]
    assert positive_logit(torch.tensor(5.0), 2.0, "sumsq").item() == 3.0
    assert positive_logit(torch.tensor(5.0), 2.0, "minssq").item() == -3.0
    with pytest.raises(ValueError, match="unknown goodness"):
        goodness(a, "l1")


def test_ff_loss_hand_values():
    g_pos, g_neg = torch.tensor([5.0, 1.0]), torch.tensor([4.0, 0.5])
    theta = 2.0
    want = (sp(2 - 5) + sp(2 - 1)) / 2 + (sp(4 - 2) + sp(0.5 - 2)) / 2
    assert ff_loss(g_pos, g_neg, theta).item() == pytest.approx(want, rel=1e-6)
    # min ssq: positive data should have the small sum of squares
    want = (sp(5 - 2) + sp(1 - 2)) / 2 + (sp(2 - 4) + sp(2 - 0.5)) / 2
    assert ff_loss(g_pos, g_neg, theta, "minssq").item() == pytest.approx(want, rel=1e-6)


def test_ff_loss_is_stable_for_huge_goodness():
    loss = ff_loss(torch.tensor([1e6]), torch.tensor([1e6]), 10.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1e6 - 10, rel=1e-6)


def test_rms_normalize():
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    y = rms_normalize(x)
    assert torch.allclose(y.square().mean(1), torch.ones(2))
    assert torch.allclose(rms_normalize(7 * x), y)  # only the direction survives
    assert torch.equal(rms_normalize(torch.zeros(1, 3)), torch.zeros(1, 3))


@pytest.mark.parametrize("kind", ["sumsq", "meansq", "minssq"])
@pytest.mark.parametrize("positive", [True, False])
def test_dloss_dz_matches_autograd(kind, positive):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.relu(z)
    theta = 1.5
    logit = positive_logit(goodness(a, kind), theta, kind)
    loss = (F.softplus(-logit) if positive else F.softplus(logit)).mean()
    (want,) = torch.autograd.grad(loss, z)
    got = dloss_dz(a.detach(), goodness(a.detach(), kind), theta, kind, positive, 6)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("kind", ["sumsq", "meansq", "minssq"])
def test_stacked_loss_terms_equal_per_layer_functions(kind):
    """All layers at once (the trainer's path) = ff_loss and dloss_dz layer by layer."""
    g = torch.Generator().manual_seed(0)
    widths, b = [5, 3], 4
    acts = [torch.relu(torch.randn(2 * b, h, generator=g, dtype=torch.float64)) for h in widths]
    thetas = [1.0, 2.5]
    ssq = torch.stack([a.square().sum(1) for a in acts])  # (L, 2B)
    col = lambda v: torch.tensor(v, dtype=torch.float64).unsqueeze(1)  # noqa: E731
    target = torch.cat([torch.ones(2, b), torch.zeros(2, b)], 1).double()
    stats, coef = goodness_loss_terms(ssq, col(thetas), col(widths), target, kind)
    for i, (a, theta) in enumerate(zip(acts, thetas, strict=True)):
        gi = goodness(a, kind)
        torch.testing.assert_close(stats[i, 0], ff_loss(gi[:b], gi[b:], theta, kind))
        torch.testing.assert_close(stats[i, 1:], torch.stack([gi[:b].mean(), gi[b:].mean()]))
        for rows, positive in ((slice(None, b), True), (slice(b, None), False)):
            want = dloss_dz(a[rows], gi[rows], theta, kind, positive, b)
            torch.testing.assert_close(coef[i, rows].unsqueeze(1) * a[rows], want)


def test_peer_norm_raises_underactive_units():
    rm = torch.tensor([0.1, 0.5, 0.9])
    d = peer_norm_dz(rm, 0.03, batch_size=1)
    assert d[0] < 0 < d[2] and d[1] == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(d, 0.03 * (rm - rm.mean()))


def test_label_rows_and_embedding():
    y = torch.tensor([2, -1])
    rows = label_rows(y, 4, torch.float32)
    assert torch.equal(rows, torch.tensor([[0, 0, 1, 0], [0.1, 0.1, 0.1, 0.1]]))
    x = torch.arange(12.0).reshape(2, 6) + 1
    over = embed_label(x, y, 4, "overlay")
    assert over.shape == (2, 6) and torch.equal(over[:, 4:], x[:, 4:])
    assert torch.equal(over[:, :4], rows)
    cat = embed_label(x, y, 4, "concat")
    assert cat.shape == (2, 10) and torch.equal(cat[:, 4:], x)
    # a row's embedding never depends on its batch-mates
    assert torch.equal(embed_label(x[:1], y[:1], 4, "overlay"), over[:1])


def test_dropout_mask_values_and_rate():
    """Inverted dropout: entries are 0 or 1/(1-p), a fraction p of them 0 (within 5 s.e.)."""
    g = torch.Generator().manual_seed(0)
    like = torch.zeros(1, dtype=torch.float64)
    m = dropout_mask((400, 500), 0.3, g, like)
    assert m.dtype == torch.float64 and m.shape == (400, 500)
    assert set(m.unique().tolist()) == {0.0, 1 / 0.7}
    n = m.numel()
    assert abs((m == 0).double().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert abs(m.mean().item() - 1.0) < 5 * math.sqrt(0.3 / 0.7 / n)  # unbiased: E[m] = 1
    # the same generator state gives the same mask
    assert torch.equal(m, dropout_mask((400, 500), 0.3, torch.Generator().manual_seed(0), like))


@pytest.mark.parametrize("field", ["input_dropout", "dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_dropout_rate_out_of_range_is_rejected(field, value):
    from fflab.ff.train import FFTrainConfig

    with pytest.raises(ValueError, match="dropout"):
        FFTrainConfig(**{field: value})
