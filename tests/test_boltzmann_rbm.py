"""RBM: formulas against brute force, samplers against exact probabilities, CD/PCD
against the exact gradient, training against the exact likelihood, API contracts."""

import io
import math

import pytest
import torch
from boltzmann_models import all_states, random_rbm

from fflab.boltzmann import (
    RBM,
    block_gibbs_step,
    cd_gradient,
    exact_gradient,
    exact_log_prob,
    free_energy,
    hidden_probs,
    momentum_schedule,
    rbm_optimizer,
    rbm_train_epoch,
    sample_hidden,
    sample_visible,
    visible_probs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def joint_log_weights(rbm, v):
    """-E(v, h) for each row of v (A, V) and every h -> (A, 2**H), plus the h states."""
    hs = all_states(rbm.n_hidden)
    W, b_v, b_h = (t.detach() for t in (rbm.W, rbm.b_v, rbm.b_h))
    return (v @ b_v)[:, None] + (hs @ b_h)[None, :] + v @ W @ hs.T, hs


def binomial_tol(p, n, z=5.0):
    """z standard errors of a mean of n Bernoulli(p) draws, floored for p near 0 or 1."""
    return z * torch.sqrt(p * (1 - p) / n) + z / n


def test_free_energy_matches_log_sum_over_hiddens():
    rbm = random_rbm(5, 4, seed=0)
    v = all_states(5)
    lw, _ = joint_log_weights(rbm, v)
    f = free_energy(v, rbm.W, rbm.b_v, rbm.b_h).detach()
    torch.testing.assert_close(f, -torch.logsumexp(lw, 1), rtol=0, atol=1e-12)
    # batched (..., V) equals looped
    v3 = v.reshape(4, 8, 5)
    torch.testing.assert_close(rbm.free_energy(v3).detach().reshape(-1), f)


def test_conditionals_match_enumerated_joint():
    rbm = random_rbm(4, 3, seed=1)
    v = all_states(4)
    lw, hs = joint_log_weights(rbm, v)
    p_h_given_v = torch.softmax(lw, 1) @ hs  # (16, 3) marginals of p(h | v)
    torch.testing.assert_close(hidden_probs(v, rbm.W, rbm.b_h).detach(), p_h_given_v)
    # p(v | h): transpose the roles by enumerating v for every h
    h = all_states(3)
    lw_vh = lw.T  # (8 h states, 16 v states)
    p_v_given_h = torch.softmax(lw_vh, 1) @ v
    torch.testing.assert_close(visible_probs(h, rbm.W, rbm.b_v).detach(), p_v_given_h)


def test_conditional_samplers_match_their_probabilities():
    rbm = random_rbm(6, 5, seed=2)
    g = torch.Generator().manual_seed(3)
    n = 20000
    v = all_states(6)[torch.tensor([3, 17, 42])]  # three fixed visible vectors
    v_rep = v.repeat_interleave(n, 0)
    with torch.no_grad():
        h, p = sample_hidden(v_rep, rbm.W, rbm.b_h, generator=g)
        assert set(h.unique().tolist()) <= {0.0, 1.0} and h.dtype == v.dtype
        freq = h.reshape(3, n, 5).mean(1)
        exact = hidden_probs(v, rbm.W, rbm.b_h)
        torch.testing.assert_close(p.reshape(3, n, 5)[:, 0], exact)
        assert ((freq - exact).abs() <= binomial_tol(exact, n)).all()

        hh = all_states(5)[torch.tensor([0, 9, 31])]
        v_s, _ = sample_visible(hh.repeat_interleave(n, 0), rbm.W, rbm.b_v, generator=g)
        exact_v = visible_probs(hh, rbm.W, rbm.b_v)
        assert ((v_s.reshape(3, n, 6).mean(1) - exact_v).abs() <= binomial_tol(exact_v, n)).all()


def test_block_gibbs_chain_samples_exact_marginal():
    rbm = random_rbm(4, 3, seed=4)
    g = torch.Generator().manual_seed(5)
    n = 40000
    v = (torch.rand(n, 4, generator=g, dtype=torch.float64) < 0.5).double()
    with torch.no_grad():
        for _ in range(40):
            v, _ = block_gibbs_step(v, rbm.W, rbm.b_v, rbm.b_h, generator=g)
    codes = (v * 2 ** torch.arange(3, -1, -1, dtype=torch.float64)).sum(1).long()
    freq = torch.bincount(codes, minlength=16).double() / n
    p = exact_log_prob(rbm, all_states(4)).detach().exp()
    tv = 0.5 * (freq - p).abs().sum()
    # E[TV] <= 0.5 sum sqrt(p(1-p)/n); one sample moves TV by <= 1/n, so by McDiarmid
    # TV exceeds that by 0.01 with probability <= exp(-2 n 0.01**2) = exp(-10).
    bound = 0.5 * torch.sqrt(p * (1 - p) / n).sum() + 0.01
    assert tv < bound, (float(tv), float(bound))


def _sampled_vs_exact(ours, exact, n_neg):
    """Negative-phase statistics lie in [0, 1]: s.e. <= 0.5 / sqrt(n); allow 6 s.e."""
    tol = 6 * 0.5 / math.sqrt(n_neg) + 2e-3
    for name in exact:
        err = (ours[name] - exact[name]).abs().max()
        assert err < tol, (name, float(err), tol)
    return tol


def _small_problem():
    rbm = random_rbm(6, 4, seed=6)
    g = torch.Generator().manual_seed(7)
    patterns = (torch.rand(10, 6, generator=g, dtype=torch.float64) < 0.5).double()
    return rbm, patterns, g


def test_long_cd_chain_gradient_converges_to_exact_gradient():
    rbm, patterns, g = _small_problem()
    data = patterns.repeat(2000, 1)  # the 10 patterns, 2000 chains each
    exact = exact_gradient(rbm, patterns)
    params = rbm.W.detach(), rbm.b_v.detach(), rbm.b_h.detach()
    tol = _sampled_vs_exact(cd_gradient(data, *params, k=30, generator=g).grads, exact, len(data))
    # CD-1 is biased: on this model it is far outside the sampling tolerance, which
    # shows the comparison above has the power to detect a short chain.
    res1 = cd_gradient(data, *params, k=1, generator=g)
    assert (res1.grads["W"] - exact["W"]).abs().max() > 2 * tol


def test_pcd_gradient_converges_to_exact_gradient_and_advances_chains():
    rbm, patterns, g = _small_problem()
    exact = exact_gradient(rbm, patterns)
    n_chains = 20000
    for _ in range(6):  # burn in the persistent chains (parameters fixed)
        rbm.pcd_gradient(patterns, k=5, generator=g, n_chains=n_chains)
    before = rbm.persistent_h.clone()
    res = rbm.pcd_gradient(patterns, k=2, generator=g)
    assert rbm.persistent_h.shape == (n_chains, 4) and not torch.equal(before, rbm.persistent_h)
    torch.testing.assert_close(rbm.persistent_v, res.v_negative)
    _sampled_vs_exact(res.grads, exact, n_chains)


def test_cd_gradient_shapes_dtypes_and_no_mutation():
    for dtype in (torch.float32, torch.float64):
        rbm = RBM(7, 3).to(dtype)
        g = torch.Generator().manual_seed(0)
        v = (torch.rand(5, 7, generator=g) < 0.5).to(dtype)
        v_copy = v.clone()
        res = rbm.cd_gradient(v, k=2, generator=g)
        assert torch.equal(v, v_copy)
        assert res.grads["W"].shape == (7, 3) and res.grads["W"].dtype == dtype
        assert res.grads["b_v"].shape == (7,) and res.grads["b_h"].shape == (3,)
        assert res.reconstruction.shape == (5, 7) and res.h_negative is None
        assert res.data_free_energy.shape == (5,)
        assert not any(t.requires_grad for t in res.grads.values())


@pytest.mark.parametrize("persistent", [False, True])
def test_cd_gradient_is_positive_minus_negative_statistics_of_its_own_states(persistent):
    # The fused GEMMs ([v_data; v]' [h_pos / B; -h_neg / C]) against the textbook formula
    # recomputed in float64 from the states the estimate reports; B != C for PCD.
    rbm = random_rbm(9, 6, 3, dtype=torch.float32)
    W, b_v, b_h = (t.detach() for t in (rbm.W, rbm.b_v, rbm.b_h))
    g = torch.Generator().manual_seed(4)
    v_data = (torch.rand(7, 9, generator=g) < 0.4).float()
    h_chain = (torch.rand(5, 6, generator=g) < 0.5).float() if persistent else None
    res = cd_gradient(v_data, W, b_v, b_h, k=2, generator=g, h_chain=h_chain)
    d, v, Wd = v_data.double(), res.v_negative.double(), W.double()
    h_pos = torch.sigmoid(d @ Wd + b_h.double())
    h_neg = torch.sigmoid(v @ Wd + b_h.double())
    want = {
        "W": d.T @ h_pos / len(d) - v.T @ h_neg / len(v),
        "b_v": d.mean(0) - v.mean(0),
        "b_h": h_pos.mean(0) - h_neg.mean(0),
    }
    for name, value in want.items():
        torch.testing.assert_close(res.grads[name].double(), value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.h_data_probs.double(), h_pos, rtol=1e-5, atol=1e-6)
    a, b = res.weight_factors  # what a training loop folds into its update instead
    torch.testing.assert_close((a @ b).double(), want["W"], rtol=1e-5, atol=1e-6)
    assert res.v_negative.shape == ((5, 9) if persistent else (7, 9))
    fe = cd_gradient(v_data, W, b_v, b_h, generator=g, h_chain=h_chain).data_free_energy
    torch.testing.assert_close(fe, free_energy(v_data, W, b_v, b_h))
    no_fe = cd_gradient(v_data, W, b_v, b_h, generator=g, h_chain=h_chain, with_free_energy=False)
    assert no_fe.data_free_energy is None


def test_state_dict_round_trip_keeps_persistent_chains():
    g = torch.Generator().manual_seed(0)
    rbm = RBM(8, 5, generator=g)
    v = (torch.rand(20, 8, generator=g) < 0.5).float()
    for _ in range(3):
        rbm.pcd_gradient(v, generator=g)
    buf = io.BytesIO()
    torch.save(rbm.state_dict(), buf)
    buf.seek(0)
    fresh = RBM(8, 5)
    fresh.load_state_dict(torch.load(buf))
    for name, t in rbm.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    assert fresh.persistent_h.shape == (20, 5)
    # the restored model continues the chains exactly as the original would
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    r1 = rbm.pcd_gradient(v, generator=g1)
    r2 = fresh.pcd_gradient(v, generator=g2)
    torch.testing.assert_close(r1.grads["W"], r2.grads["W"], rtol=0, atol=0)


def test_init_visible_bias_from_data():
    rbm = RBM(3, 2)
    data = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    rbm.init_visible_bias_from(data, eps=0.01)
    p = torch.tensor([0.75, 0.75, 0.01])
    torch.testing.assert_close(rbm.b_v.detach(), torch.log(p / (1 - p)))


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x = torch.from_numpy(datasets.load_digits().data)
    return (x > 7).double()


@pytest.mark.parametrize("persistent", [False, True])
def test_training_raises_exact_log_likelihood(persistent):
    data = _digits()  # 1797 x 64, binarized
    g = torch.Generator().manual_seed(0)
    rbm = RBM(64, 10, generator=g).double()
    rbm.init_visible_bias_from(data)
    with torch.no_grad():
        start = float(exact_log_prob(rbm, data).mean())  # ~ the independent-pixel model
    opt = rbm_optimizer(rbm, weight_decay=2e-4)
    metrics = []
    n_epochs = 14 if persistent else 8
    for epoch in range(n_epochs):
        # PCD wants a gentler step: constant momentum 0.5 and a final lr decay.
        lr = (0.05 if epoch < 10 else 0.01) if persistent else 0.05
        momentum = 0.5 if persistent else momentum_schedule(epoch, switch_epoch=2)
        for group in opt.param_groups:
            group.update(lr=lr, momentum=momentum)
        metrics.append(
            rbm_train_epoch(
                rbm, data, batch_size=20, optimizer=opt, k=1, persistent=persistent, generator=g
            )
        )
    with torch.no_grad():
        end = float(exact_log_prob(rbm, data).mean())
    # Hidden units that model pixel correlations must beat independent pixels clearly
    # (about 4-5 nats here; the bar is 2.5).
    assert end > start + 2.5, (start, end)
    assert metrics[-1]["reconstruction_error"] < metrics[0]["reconstruction_error"]
    assert all(opt.state[p]["velocity"].abs().sum() > 0 for p in rbm.parameters())
    assert (rbm.persistent_h.shape[0] == 20) == persistent


def test_bad_input_raises():
    g = torch.Generator().manual_seed(0)
    rbm = RBM(4, 3)
    with pytest.raises(ValueError, match="n_visible"):
        RBM(0, 3)
    with pytest.raises(ValueError, match="n_hidden"):
        RBM(3, 2.5)
    with pytest.raises(ValueError, match=r"shape \(batch, 4\)"):
        rbm.cd_gradient(torch.zeros(2, 5), generator=g)
    with pytest.raises(ValueError, match=r"shape \(batch, 4\)"):
        rbm.cd_gradient(torch.zeros(4), generator=g)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rbm.cd_gradient(torch.full((2, 4), 1.5), generator=g)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rbm.pcd_gradient(torch.full((2, 4), float("nan")), generator=g)
    with pytest.raises(ValueError, match="generator"):
        rbm.cd_gradient(torch.zeros(2, 4), generator=0)
    with pytest.raises(ValueError, match="k must be"):
        rbm.cd_gradient(torch.zeros(2, 4), k=0, generator=g)
    with pytest.raises(ValueError, match="torch.Tensor"):
        rbm.free_energy("0101")
    # integer 0/1 data is taken as the model's floats
    torch.testing.assert_close(
        rbm.free_energy(torch.zeros(2, 4, dtype=torch.long)), rbm.free_energy(torch.zeros(2, 4))
    )
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        rbm.visible_probs(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lr"):
        rbm_optimizer(rbm, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        rbm_optimizer(rbm, momentum=1.5)
    with pytest.raises(ValueError, match="not a parameter"):  # another RBM's optimizer
        rbm_train_epoch(rbm, torch.zeros(4, 4), optimizer=rbm_optimizer(RBM(4, 3)), generator=g)
    with pytest.raises(ValueError, match="batch_size"):
        rbm_train_epoch(rbm, torch.zeros(4, 4), batch_size=0, generator=g)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("folded", [False, True])
def test_rbm_optimizer_step_by_hand(momentum, folded):
    """v = m v + lr (g - wd p) with wd on W only, then p += v; twice, so the carried
    velocity counts (the momentum-0 path must still leave the right velocity behind).
    folded: W's gradient given as factors [[0.5]] @ [[0.5, 2]], folded in by one GEMM."""
    f64 = torch.float64
    rbm = RBM(1, 2).double()
    with torch.no_grad():
        rbm.W.copy_(torch.tensor([[1.0, -2.0]], dtype=f64))
        rbm.b_v.copy_(torch.tensor([0.5], dtype=f64))
    grads = {"W": torch.tensor([[0.25, 1.0]], dtype=f64), "b_v": torch.tensor([-1.0], dtype=f64)}
    grads["b_h"] = torch.tensor([2.0, 0.0], dtype=f64)
    factors = (torch.tensor([[0.5]], dtype=f64), torch.tensor([[0.5, 2.0]], dtype=f64))
    lr, wd = 0.1, 0.2
    w, b = rbm.W.detach().clone(), rbm.b_v.detach().clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    opt = rbm_optimizer(rbm, lr=lr, momentum=momentum, weight_decay=wd)
    for _ in range(2):
        for name, p in rbm.named_parameters():
            if folded and name == "W":
                opt.fold_product_(p, *factors)
            else:
                opt.fold_(p, grads[name])
        opt.step()
        vw = momentum * vw + lr * (grads["W"] - wd * w)
        vb = momentum * vb + lr * grads["b_v"]
        w, b = w + vw, b + vb
        torch.testing.assert_close(rbm.W.detach(), w, rtol=0, atol=1e-15)
        torch.testing.assert_close(rbm.b_v.detach(), b, rtol=0, atol=1e-15)
        torch.testing.assert_close(opt.state[rbm.W]["velocity"], vw, rtol=0, atol=1e-15)
    assert grads["W"].tolist() == [[0.25, 1.0]]  # the gradients are not consumed
