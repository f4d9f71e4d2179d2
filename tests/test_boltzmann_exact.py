"""Exact enumeration against an independent brute force, and against autograd."""

import pytest
import torch
from boltzmann_models import all_states, random_bm, random_rbm

from fflab.boltzmann import (
    RBM,
    BoltzmannMachine,
    exact_gradient,
    exact_log_prob,
    exact_log_z,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_neg_energy(v, h, W, L, J, b_v, b_h):
    """-E(v, h) for every pair of rows of v (A, V) and h (B, H), term by term -> (A, B)."""
    vv = torch.einsum("ai,ij,aj->a", v, L, v)
    hh = torch.einsum("bi,ij,bj->b", h, J, h)
    vh = torch.einsum("ai,ij,bj->ab", v, W, h)
    return (v @ b_v + 0.5 * vv)[:, None] + (h @ b_h + 0.5 * hh)[None, :] + vh


def brute_log_p(model, v):
    """log p(v) of each row of v by summing exp(-E) over every joint state (float64)."""
    n_v, n_h = model.n_visible, model.n_hidden
    W, b_v, b_h = model.W, model.b_v, model.b_h
    L = getattr(model, "L", torch.zeros(n_v, n_v, dtype=torch.float64))
    J = getattr(model, "J", torch.zeros(n_h, n_h, dtype=torch.float64))
    hs = all_states(n_h)
    log_z = torch.logsumexp(brute_neg_energy(all_states(n_v), hs, W, L, J, b_v, b_h).reshape(-1), 0)
    return torch.logsumexp(brute_neg_energy(v, hs, W, L, J, b_v, b_h), 1) - log_z, log_z


@pytest.mark.parametrize("shape", [(5, 3), (3, 6), (4, 4)])
def test_rbm_log_z_matches_brute_force_either_side_enumerated(shape):
    rbm = random_rbm(*shape, seed=1)
    _, log_z = brute_log_p(rbm, all_states(shape[0])[:1])
    torch.testing.assert_close(exact_log_z(rbm).detach(), log_z.detach(), rtol=0, atol=1e-10)


def test_bm_log_z_and_log_prob_match_brute_force():
    bm = random_bm(3, 2, seed=2)
    vs = all_states(3)
    log_p, log_z = brute_log_p(bm, vs)
    torch.testing.assert_close(exact_log_z(bm).detach(), log_z.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(exact_log_prob(bm, vs).detach(), log_p.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("model", [random_rbm(6, 3, seed=3), random_rbm(3, 7, seed=4)])
def test_rbm_log_prob_matches_brute_force_and_normalizes(model):
    vs = all_states(model.n_visible)
    log_p, _ = brute_log_p(model, vs)
    ours = exact_log_prob(model, vs).detach()
    torch.testing.assert_close(ours, log_p.detach(), rtol=0, atol=1e-10)
    assert abs(float(torch.logsumexp(ours, 0))) < 1e-10


def test_exact_works_in_float32_model_and_returns_float64():
    rbm = random_rbm(5, 4, seed=5)
    rbm32 = RBM(5, 4)
    rbm32.load_state_dict({k: v.float() for k, v in rbm.state_dict().items()})
    z = exact_log_z(rbm32)
    assert z.dtype == torch.float64
    assert abs(float(z.detach()) - float(exact_log_z(rbm).detach())) < 1e-5


def _data(n_visible, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, n_visible, generator=g, dtype=torch.float64) < 0.4).double()


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_rbm_exact_gradient_equals_autograd_of_brute_force_log_likelihood(shape):
    rbm = random_rbm(*shape, seed=6)
    data = _data(shape[0], 12, seed=7)
    log_p, _ = brute_log_p(rbm, data)
    auto = torch.autograd.grad(log_p.mean(), [rbm.W, rbm.b_v, rbm.b_h])
    ours = exact_gradient(rbm, data)
    assert set(ours) == {"W", "b_v", "b_h"}
    for name, g in zip(["W", "b_v", "b_h"], auto, strict=True):
        torch.testing.assert_close(ours[name], g, rtol=0, atol=1e-10)
    # and the library's own log-probability is differentiable to the same gradient
    auto2 = torch.autograd.grad(exact_log_prob(rbm, data, grad=True).mean(), [rbm.W])[0]
    torch.testing.assert_close(ours["W"], auto2, rtol=0, atol=1e-10)


def test_bm_exact_gradient_equals_autograd_with_tied_symmetric_weights():
    bm = random_bm(3, 2, seed=8)
    data = _data(3, 10, seed=9)
    log_p, _ = brute_log_p(bm, data)
    names = ["W", "L", "J", "b_v", "b_h"]
    grads = torch.autograd.grad(log_p.mean(), [getattr(bm, n) for n in names])
    auto = dict(zip(names, grads, strict=True))
    # L_ij and L_ji are one parameter: its derivative is G_ij + G_ji (diagonal fixed at 0).
    for name in ("L", "J"):
        g = auto[name]
        auto[name] = (g + g.T) * (1 - torch.eye(g.shape[0], dtype=g.dtype))
    ours = exact_gradient(bm, data)
    assert set(ours) == set(names)
    for name in names:
        torch.testing.assert_close(ours[name], auto[name], rtol=0, atol=1e-10)


def test_too_large_models_raise():
    with pytest.raises(ValueError, match="too large for exact enumeration.*limit 24"):
        exact_log_z(RBM(30, 25))
    with pytest.raises(ValueError, match="too large for exact enumeration.*limit 24"):
        exact_log_z(BoltzmannMachine(20, 5))
    with pytest.raises(ValueError, match="too large"):
        exact_gradient(BoltzmannMachine(20, 5), torch.zeros(2, 20))


def test_bad_data_raises():
    rbm = random_rbm(4, 3, seed=10)
    with pytest.raises(ValueError, match="binary"):
        exact_log_prob(rbm, torch.full((2, 4), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(batch, 4\)"):
        exact_log_prob(rbm, torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="binary"):
        exact_gradient(rbm, torch.full((2, 4), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="RBM or a BoltzmannMachine"):
        exact_log_z(torch.nn.Linear(2, 2))


def test_evaluation_gives_plain_values_and_takes_numpy():
    """float() of an exact value needs no detach; numpy 0/1 rows (any dtype) are accepted."""
    import warnings

    import numpy as np

    rbm = RBM(6, 4, generator=torch.Generator().manual_seed(0))  # float32 parameters
    v = np.random.default_rng(0).integers(0, 2, (5, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = float(exact_log_z(rbm))
        lp = exact_log_prob(rbm, v)
    assert not lp.requires_grad and lp.dtype == torch.float64
    torch.testing.assert_close(lp, exact_log_prob(rbm, torch.from_numpy(v).double()))
    assert z == pytest.approx(float(exact_log_z(rbm, grad=True).detach()))
    # the model's own methods take numpy and float64 data for a float32 model
    fe = rbm.free_energy(v.astype(np.float64))
    assert fe.dtype == torch.float32
    torch.testing.assert_close(fe, rbm.free_energy(torch.from_numpy(v).float()))
