"""AIS estimates of log Z against exact enumeration."""

import math

import pytest
import torch
from boltzmann_models import random_rbm

from fflab.boltzmann import (
    ais_log_weights,
    ais_log_z,
    average_log_prob,
    default_beta_schedule,
    exact_log_prob,
    exact_log_z,
    make_base_rate_visible_bias,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact(rbm):
    with torch.no_grad():
        return float(exact_log_z(rbm))


@pytest.mark.parametrize(
    ("shape", "std", "seed", "dtype"),
    [
        ((10, 8), 0.5, 0, torch.float64),
        ((10, 8), 1.0, 1, torch.float64),
        ((10, 8), 1.0, 2, torch.float32),
        ((12, 20), 0.75, 3, torch.float32),  # exact enumerates the 12 visibles here
    ],
)
def test_ais_within_its_error_bar_of_exact_log_z(shape, std, seed, dtype):
    rbm = random_rbm(*shape, seed=seed, std=std, bias_std=1.0, dtype=dtype)
    g = torch.Generator().manual_seed(100 + seed)
    est = ais_log_z(rbm, n_chains=200, n_betas=3000, generator=g)
    exact = _exact(rbm)
    # A useful estimate has a small error bar, and the truth lies within 3 of them
    # (plus a little for the downward Jensen bias of log mean w and float32 sums).
    assert 0 < est.std_error < 0.1, est
    assert abs(est.log_z - exact) < 3 * est.std_error + 0.01, (est, exact)


def test_ais_with_data_base_rate_and_average_log_prob():
    rbm = random_rbm(10, 8, seed=4, std=0.8, bias_std=1.0)
    g = torch.Generator().manual_seed(5)
    data = (torch.rand(500, 10, generator=g, dtype=torch.float64) < 0.3).double()
    base = make_base_rate_visible_bias(data)
    assert base.shape == (10,) and base.dtype == torch.float64
    est = ais_log_z(rbm, n_chains=200, n_betas=3000, generator=g, base_visible_bias=base)
    exact = _exact(rbm)
    assert abs(est.log_z - exact) < 3 * est.std_error + 0.01, (est, exact)
    # with the exact log Z, the free-energy form equals the enumerated log-probability
    with torch.no_grad():
        want = float(exact_log_prob(rbm, data).mean())
    assert abs(average_log_prob(rbm, data, exact) - want) < 1e-9


def test_ais_is_exact_when_the_base_is_the_model():
    """W = 0 and base bias = b_v: every intermediate distribution equals the base, so
    every log-weight is exactly 0 and log Z = H log 2 + sum softplus(b_v)."""
    rbm = random_rbm(9, 6, seed=6, std=0.0, bias_std=1.0)
    g = torch.Generator().manual_seed(7)
    est = ais_log_z(rbm, n_chains=20, n_betas=100, generator=g, base_visible_bias=rbm.b_v.detach())
    assert abs(est.log_z - _exact(rbm)) < 1e-10
    assert est.std_error < 1e-12


@pytest.mark.parametrize("n_steps", [1, 50])
def test_mean_weight_is_unbiased_for_z_ratio(n_steps):
    """E[w] = Z / Z_0 for any schedule (one step is plain importance sampling from the
    base); a wrong transition or increment biases it. Checked on many chains."""
    rbm = random_rbm(6, 4, seed=8, std=1.0, bias_std=1.0)
    g = torch.Generator().manual_seed(9)
    base = torch.zeros(6, dtype=torch.float64)
    n = 40000
    log_w = ais_log_weights(
        rbm.W,
        rbm.b_v,
        rbm.b_h,
        base,
        default_beta_schedule(n_steps) if n_steps > 2 else torch.tensor([0.0, 1.0]),
        n_chains=n,
        generator=g,
    )
    w = log_w.exp()
    ratio = math.exp(_exact(rbm) - 4 * math.log(2) - 6 * math.log(2))  # Z_0 = 2**(V+H)
    se = float(w.std()) / math.sqrt(n)
    assert abs(float(w.mean()) - ratio) < 5 * se, (float(w.mean()), ratio, se)


def test_default_schedule_is_salakhutdinov_murray():
    betas = default_beta_schedule()
    assert betas.shape == (14501,) and betas.dtype == torch.float64
    assert betas[0] == 0 and betas[-1] == 1 and torch.all(betas[1:] > betas[:-1])
    assert abs(float(betas[500]) - 0.5) < 1e-12 and abs(float(betas[4500]) - 0.9) < 1e-12
    small = default_beta_schedule(29)
    assert small.shape == (30,) and abs(float(small[1]) - 0.5) < 1e-12


def test_bad_input_raises():
    rbm = random_rbm(4, 3, seed=0, std=0.1, bias_std=1.0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="increase strictly from 0 to 1"):
        ais_log_z(rbm, generator=g, betas=torch.tensor([0.0, 0.7, 0.5, 1.0]))
    with pytest.raises(ValueError, match="base_visible_bias"):
        ais_log_z(rbm, n_betas=10, generator=g, base_visible_bias=torch.zeros(5))
    with pytest.raises(ValueError, match="n_chains"):
        ais_log_z(rbm, n_chains=1, n_betas=10, generator=g)
    with pytest.raises(ValueError, match="n_betas"):
        default_beta_schedule(2)
    with pytest.raises(ValueError, match="generator"):
        ais_log_z(rbm, n_betas=10, generator=None)
    with pytest.raises(ValueError, match="binary"):
        average_log_prob(rbm, torch.full((2, 4), 0.5), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_base_rate_visible_bias(torch.full((2, 4), 3.0))
