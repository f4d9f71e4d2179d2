"""FFNet and the fast trainer against plain reference paths, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fflab.ff.functional import goodness, peer_norm_dz
from fflab.ff.model import NEUTRAL, FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, FFTrainer
from fflab.negatives import random_wrong_labels


def tiny(kind="sumsq", mode="overlay", peer=0.0, **kw):
    g = torch.Generator().manual_seed(0)
    threshold = 3.0 if kind == "minssq" else None
    cfg = FFNetConfig(
        in_features=20,
        num_classes=4,
        hidden=(7, 6, 5),
        goodness=kind,
        label_mode=mode,
        peer_norm=peer,
        threshold=threshold,
        **kw,
    )
    return FFNet(cfg, generator=g).double()


def batch(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 20, generator=g, dtype=torch.float64)
    x[:, :4] = 0  # MNIST's black border: overlay replaces these pixels
    return x, torch.randint(0, 4, (n,), generator=g)


def captured_grads(net, x, y, negatives="random", seed=5):
    tr = FFTrainer(net, FFTrainConfig(negatives=negatives))
    tr.fused = False  # write the gradients to .grad
    tr.optimizer.step = lambda: None  # keep the weights, read the gradients
    tr.step(x, y, torch.Generator().manual_seed(seed))
    return [(m.weight.grad.clone(), m.bias.grad.clone()) for m in net.layers]


@pytest.mark.parametrize("mode", ["overlay", "concat"])
@pytest.mark.parametrize("kind", ["sumsq", "meansq", "minssq"])
def test_fast_step_gradients_equal_autograd_of_local_losses(kind, mode):
    net = tiny(kind, mode)
    x, y = batch()
    got = captured_grads(net, x, y)
    y_neg = random_wrong_labels(y, 4, torch.Generator().manual_seed(5))
    net.zero_grad(set_to_none=True)
    sum(net.layer_losses(x, y, y_neg)).backward()
    for (gw, gb), m in zip(got, net.layers, strict=True):
        assert torch.allclose(gw, m.weight.grad, atol=1e-12)
        assert torch.allclose(gb, m.bias.grad, atol=1e-12)


def test_head_gradient_equals_autograd_of_cross_entropy():
    """The softmax head learns from the neutral pass: its gradient is that of cross-entropy."""
    net = tiny()
    x, y = batch()
    captured_grads(net, x, y)
    got = net.head.weight.grad.clone(), net.head.bias.grad.clone()
    net.zero_grad(set_to_none=True)
    feats = net.head_features(net.neutral_activities(x))
    F.cross_entropy(net.head(feats), y).backward()
    torch.testing.assert_close(got[0], net.head.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], net.head.bias.grad, rtol=0, atol=1e-12)
    # the head starts at zero: its first gradient is (1/C - one-hot) averaged over the batch
    torch.testing.assert_close(got[1], (0.25 - F.one_hot(y, 4).double()).mean(0))


def test_peer_normalization_term_in_gradient():
    x, y = batch()
    plain, peer = tiny(peer=0.0), tiny(peer=0.5)
    g0 = captured_grads(plain, x, y)
    g1 = captured_grads(peer, x, y)
    acts = plain.activities(x, y)
    for i, ((w0, b0), (w1, b1)) in enumerate(zip(g0, g1, strict=True)):
        rm = 0.9 * 0.5 + 0.1 * acts[i].mean(0)  # one update of the running mean from 0.5
        assert torch.allclose(peer.running_mean(i), rm)
        extra = peer_norm_dz(rm, 0.5, x.shape[0])  # added to every positive sample's dL/dz
        assert torch.allclose(b1 - b0, extra * x.shape[0], atol=1e-12)
        assert not torch.allclose(w1, w0)


def test_no_gradient_crosses_layers():
    net = tiny()
    x, y = batch()
    losses = net.layer_losses(x, y, (y + 1) % 4)
    losses[2].backward()
    for m in net.layers[:2]:
        assert m.weight.grad is None and m.bias.grad is None
    assert net.layers[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["overlay", "concat"])
def test_shared_first_layer_equals_plain_path(mode):
    net = tiny(mode=mode)
    x, y = batch()
    a_img, sq = net.image_part(x)
    z = net.first_layer(a_img, net.label_scale(sq, False), y)
    assert torch.allclose(torch.relu(z), net.activities(x, y)[0], atol=1e-12)
    z = net.first_layer(a_img, net.label_scale(sq, True), None)
    neutral = torch.full_like(y, NEUTRAL)
    assert torch.allclose(torch.relu(z), net.activities(x, neutral)[0], atol=1e-12)
    for got, want in zip(net.neutral_activities(x), net.activities(x, neutral), strict=True):
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("kind", ["sumsq", "meansq", "minssq"])
@pytest.mark.parametrize("score_from", [0, 1, 2])
def test_batched_label_scores_equal_per_label_loop(kind, score_from):
    net = tiny(kind, score_from=score_from)
    x, _ = batch()
    sign = -1.0 if kind == "minssq" else 1.0
    loop = torch.stack(
        [
            sum(
                sign * goodness(a, kind)
                for a in net.activities(x, torch.full((9,), c))[score_from:]
            )
            for c in range(4)
        ],
        dim=1,
    )
    assert torch.allclose(net.label_scores(x), loop, atol=1e-10)


def test_prediction_does_not_depend_on_batch_mates():
    torch.manual_seed(0)
    net = FFNet(FFNetConfig(hidden=(50, 40, 30)), generator=torch.Generator().manual_seed(3))
    torch.nn.init.normal_(net.head.weight, generator=torch.Generator().manual_seed(4))
    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(2))
    for mode in ("goodness", "softmax"):
        together = net.predict(x, mode)
        alone = torch.cat([net.predict(x[i : i + 1], mode) for i in range(64)])
        assert torch.equal(together, alone)
        assert torch.equal(net.predict(torch.flip(x, [0]), mode), torch.flip(together, [0]))
    scores_alone = net.label_scores(x[:1])
    assert torch.allclose(net.label_scores(x)[:1], scores_alone, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["overlay", "concat"])
def test_fused_update_equals_gradient_then_step(mode):
    """Folding weight gradients into SmoothedSGD's state by GEMM = .grad + optimizer.step."""
    nets = [tiny(mode=mode, peer=0.06), tiny(mode=mode, peer=0.06)]
    trainers = [FFTrainer(n, FFTrainConfig(weight_cost=0.01)) for n in nets]
    trainers[1].fused = False
    for seed in range(4):
        x, y = batch(seed=seed)
        for tr in trainers:
            tr.step(x, y, torch.Generator().manual_seed(seed))
    assert trainers[0].fused and nets[0].layers[0].weight.grad is None
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)
    moved = nets[0].layers[0].weight - tiny(mode=mode).layers[0].weight
    assert moved[:, :4].abs().min() > 0 and moved[:, 4:].abs().max() > 1e-4  # both blocks learn


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_step_never_reads_a_tensor_value_on_the_host(negatives, dropout):
    """A step reads no tensor value on the host: no op that copies one back (``.item()``,
    ``float(t)``, ``F.one_hot``'s range check) and no ``nonzero`` among its operations. (What
    an op does inside, e.g. multinomial, and ``.cpu()`` on CPU are not seen.)"""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    cfg = FFTrainConfig(negatives=negatives, input_dropout=dropout, dropout=dropout)
    tr = FFTrainer(tiny(peer=0.06), cfg)
    x, y = batch()
    tr.step(x, y, torch.Generator().manual_seed(0))  # first step: creates optimizer state
    with Record():
        tr.step(x, y, torch.Generator().manual_seed(1))
    assert "addmm_.default" in seen  # the recorder saw the step's products
    assert not [f for f in seen if f.startswith(("_local_scalar_dense", "nonzero"))]


def test_greedy_step_updates_only_the_active_layer():
    net = tiny()
    before = [m.weight.detach().clone() for m in net.layers]
    head = net.head.weight.detach().clone()
    tr = FFTrainer(net, FFTrainConfig(layer_schedule="greedy"))
    x, y = batch()
    tr.step(x, y, torch.Generator().manual_seed(0), active=range(1, 2))
    changed = [not torch.equal(b, m.weight) for b, m in zip(before, net.layers, strict=True)]
    assert changed == [False, True, False]
    assert not torch.equal(head, net.head.weight)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="goodness must be one of"):
        FFNetConfig(goodness="abs")
    with pytest.raises(ValueError, match="score_from must be in 0..1"):
        FFNetConfig(hidden=(10, 10), score_from=2)
    with pytest.raises(ValueError, match="negatives must be"):
        FFTrainConfig(negatives="adversarial")
