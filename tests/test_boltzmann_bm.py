"""General Boltzmann machine: Gibbs sampling and sampled gradients against enumeration."""

import io
import math

import pytest
import torch
from boltzmann_models import all_states, random_bm

from fflab.boltzmann import (
    BoltzmannMachine,
    bm_optimizer,
    exact_gradient,
    exact_log_prob,
    gibbs_sweep,
    pairwise_statistics,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def joint_probs(bm):
    """p(v, h) of every joint state by enumeration with the module's energy -> (2**D,)."""
    s = all_states(bm.n_units)
    with torch.no_grad():
        e = bm.energy(s[:, : bm.n_visible], s[:, bm.n_visible :])
    return torch.softmax(-e, 0), s


def codes(s):
    """Row index of each binary row in all_states order (first column most significant)."""
    n = s.shape[1]
    return (s * 2 ** torch.arange(n - 1, -1, -1, dtype=s.dtype)).sum(1).long()


def test_constraints_hold_after_construction_and_updates():
    bm = random_bm(4, 3, seed=0)
    for M in (bm.L, bm.J):
        assert torch.equal(M, M.T) and torch.all(M.diagonal() == 0)
    g = torch.Generator().manual_seed(1)
    data = (torch.rand(8, 4, generator=g) < 0.5).double()
    opt = bm_optimizer(bm, lr=0.1, momentum=0.5, weight_decay=1e-3)
    for _ in range(3):
        grads = bm.gradient(data, generator=g)
        for name in ("L", "J"):
            assert torch.equal(grads[name], grads[name].T)
            assert torch.all(grads[name].diagonal() == 0)
        bm.apply_gradient_(grads, opt)
    for M in (bm.L, bm.J):
        assert torch.equal(M, M.T) and torch.all(M.diagonal() == 0)


def test_update_decays_the_weights_only():
    """bm_optimizer's step: v = m v + lr (g - wd p) with wd on W, L, J; p += v."""
    bm = random_bm(3, 2, seed=3)
    before = {n: p.detach().clone() for n, p in bm.named_parameters()}
    grads = {n: torch.full_like(p, 0.5) for n, p in bm.named_parameters()}
    for name in ("L", "J"):  # the tied-pair convention: symmetric, zero diagonal
        grads[name].fill_diagonal_(0.0)
    opt = bm_optimizer(bm, lr=0.1, momentum=0.5, weight_decay=0.2)
    bm.apply_gradient_(grads, opt)
    for name, p in bm.named_parameters():
        decay = 0.2 * before[name] if name in ("W", "L", "J") else 0.0
        v = 0.1 * (grads[name] - decay)
        torch.testing.assert_close(p.detach(), before[name] + v, rtol=0, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["velocity"], v, rtol=0, atol=1e-15)


def test_energy_matches_explicit_sum_over_pairs():
    bm = random_bm(3, 2, seed=2)
    with torch.no_grad():
        for s in all_states(5):
            v, h = s[:3], s[3:]
            e = -(bm.b_v @ v) - (bm.b_h @ h)
            e -= sum(bm.L[i, j] * v[i] * v[j] for i in range(3) for j in range(i + 1, 3))
            e -= sum(bm.J[i, j] * h[i] * h[j] for i in range(2) for j in range(i + 1, 2))
            e -= sum(bm.W[i, j] * v[i] * h[j] for i in range(3) for j in range(2))
            torch.testing.assert_close(bm.energy(v, h), e)


def test_long_gibbs_run_matches_exact_joint_distribution():
    bm = random_bm(3, 2, seed=3, std=1.5)  # strong lateral weights
    p, _ = joint_probs(bm)
    g = torch.Generator().manual_seed(4)
    n = 40000
    s = (torch.rand(n, 5, generator=g, dtype=torch.float64) < 0.5).double()
    s = bm.sample(s, 50, generator=g)  # burn-in
    freq = torch.zeros(32, dtype=torch.float64)
    for _ in range(4):  # average a few snapshots: never a larger variance than one
        s = bm.sample(s, 5, generator=g)
        freq += torch.bincount(codes(s), minlength=32).double() / (4 * n)
    tv = 0.5 * (freq - p).abs().sum()
    # E[TV] <= 0.5 sum sqrt(p(1-p)/n) for n independent chains; one chain moves the
    # estimate by <= 1/n, so by McDiarmid P(TV > E[TV] + 0.01) <= exp(-2 n 0.01**2).
    bound = 0.5 * torch.sqrt(p * (1 - p) / n).sum() + 0.01
    assert tv < bound, (float(tv), float(bound))
    # the oracle has power: with the lateral weights ignored the sample is far off
    rbm_like = random_bm(3, 2, seed=3, std=1.5)
    with torch.no_grad():
        rbm_like.L.zero_()
        rbm_like.J.zero_()
    p0, _ = joint_probs(rbm_like)
    assert 0.5 * (p0 - p).abs().sum() > 3 * bound


def test_clamped_sweeps_sample_exact_posterior():
    bm = random_bm(3, 3, seed=5, std=1.5)
    p, states = joint_probs(bm)
    v = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    mask = (states[:, :3] == v).all(1)
    post = p[mask] / p[mask].sum()  # p(h | v) over the 8 hidden states, in code order
    g = torch.Generator().manual_seed(6)
    n = 40000
    s = torch.cat([v.expand(n, 3), torch.zeros(n, 3, dtype=torch.float64)], 1)
    A, b = bm.joint_weights()
    with torch.no_grad():
        s = gibbs_sweep(s, A, b, generator=g, start=3, n_sweeps=30)
    assert torch.all(s[:, :3] == v)  # clamped units never move
    freq = torch.bincount(codes(s[:, 3:]), minlength=8).double() / n
    bound = 0.5 * torch.sqrt(post * (1 - post) / n).sum() + 0.01
    assert 0.5 * (freq - post).abs().sum() < bound


def test_sampled_gradient_converges_to_exact_gradient():
    bm = random_bm(3, 2, seed=7)
    g = torch.Generator().manual_seed(8)
    patterns = all_states(3)[torch.tensor([1, 2, 5, 6, 7])]
    data = patterns.repeat(4000, 1)
    grads = bm.gradient(data, generator=g, positive="gibbs", positive_sweeps=20, negative_sweeps=60)
    exact = exact_gradient(bm, patterns)
    n = data.shape[0]
    # each statistic lies in [0, 1]: positive and negative means each have s.e. <= 0.5/sqrt(n)
    tol = 6 * math.sqrt(2 * 0.25 / n) + 2e-3
    for name in exact:
        err = (grads[name] - exact[name]).abs().max()
        assert err < tol, (name, float(err), tol)


def test_mean_field_positive_phase_is_exact_without_hidden_laterals():
    bm = random_bm(3, 3, seed=9)
    with torch.no_grad():
        bm.J.zero_()
    g = torch.Generator().manual_seed(10)
    data = all_states(3)[torch.tensor([0, 3, 5, 7])]
    pos = bm.positive_statistics(data, generator=g, method="mean_field")
    # brute force: E over p(h | v) for each data vector, by enumeration
    p, states = joint_probs(bm)
    want = {k: torch.zeros_like(t) for k, t in pos.items()}
    for v in data:
        mask = (states[:, :3] == v).all(1)
        w = p[mask] / p[mask].sum()
        hs = states[mask][:, 3:]
        stats = pairwise_statistics(v.expand(len(hs), 3), hs, w)
        for k in want:
            want[k] += stats[k] / len(data)
    for k in want:
        torch.testing.assert_close(pos[k], want[k], rtol=0, atol=1e-8)


def test_model_sampling_is_exact_also_for_rbm_shaped_machine():
    """With L = J = 0 the BM's marginal over v must equal the exact RBM-like marginal."""
    bm = random_bm(4, 2, seed=11)
    with torch.no_grad():
        bm.L.zero_()
        bm.J.zero_()
    g = torch.Generator().manual_seed(12)
    n = 40000
    bm.negative_statistics(generator=g, n_sweeps=40, n_chains=n)
    freq = torch.bincount(codes(bm.persistent_chains[:, :4]), minlength=16).double() / n
    with torch.no_grad():
        p = exact_log_prob(bm, all_states(4)).exp()
    bound = 0.5 * torch.sqrt(p * (1 - p) / n).sum() + 0.01
    assert 0.5 * (freq - p).abs().sum() < bound


def test_state_dict_round_trip_keeps_persistent_chains():
    g = torch.Generator().manual_seed(0)
    bm = BoltzmannMachine(4, 3, generator=g)
    data = (torch.rand(6, 4, generator=g) < 0.5).float()
    bm.gradient(data, generator=g, n_chains=11)
    buf = io.BytesIO()
    torch.save(bm.state_dict(), buf)
    buf.seek(0)
    fresh = BoltzmannMachine(4, 3)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.persistent_chains.shape == (11, 7)
    for name, t in bm.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name


def test_bad_input_raises():
    g = torch.Generator().manual_seed(0)
    bm = BoltzmannMachine(3, 2)
    with pytest.raises(ValueError, match="n_hidden"):
        BoltzmannMachine(3, 0)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        bm.gradient(torch.zeros(2, 4), generator=g)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bm.gradient(torch.full((2, 3), -1.0), generator=g)
    with pytest.raises(ValueError, match="method"):
        bm.positive_statistics(torch.zeros(2, 3), generator=g, method="exact")
    with pytest.raises(ValueError, match="generator"):
        bm.sample(torch.zeros(2, 5), 1, generator=None)
    with pytest.raises(ValueError, match=r"shape \(batch, 5\)"):
        bm.sample(torch.zeros(2, 3), 1, generator=g)
