"""The shared FF core: the fast step against the plain autograd reference, in float64.

Every mode (supervised overlay / concat, unsupervised), goodness function, negative source,
peer normalization, dropout and layer schedule that both trainers support: same generator,
same draws, same gradients; and the fused update equals the reference's ``.grad`` + step.
"""

import pytest
import torch

from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.reference import ReferenceTrainer
from fflab.ff.train import FFTrainConfig, FFTrainer
from fflab.negatives import NEGATIVE_SOURCES, NegativeBatch, NegativeSource, register


def net_for(mode="overlay", kind="sumsq", peer=0.0, seed=0, hidden=(7, 6, 5), **kw):
    threshold = 3.0 if kind == "minssq" else None
    if mode == "none":
        kw.setdefault("image_shape", (1, 4, 5))
    cfg = FFNetConfig(
        in_features=20,
        num_classes=4,
        hidden=hidden,
        goodness=kind,
        label_mode=mode,
        peer_norm=peer,
        threshold=threshold,
        head_from=1,
        **kw,
    )
    return FFNet(cfg, generator=torch.Generator().manual_seed(seed)).double()


def batch(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 20, generator=g, dtype=torch.float64)
    x[:, :4] = 0  # MNIST's black border: overlay replaces these pixels
    return x, torch.randint(0, 4, (n,), generator=g)


def grads(trainer, x, y, seed, active=None):
    """Run compute_gradients and return (stats, every parameter's .grad or None, buffers)."""
    trainer.fused = False  # the fast trainer writes .grad too
    stats = trainer.compute_gradients(x, y, torch.Generator().manual_seed(seed), active)
    net = trainer.net
    g = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    return stats, g, [b.clone() for b in net.buffers()]


CASES = [
    # (label_mode, goodness, negatives, peer_norm, input_dropout, dropout, train options)
    ("overlay", "sumsq", "random", 0.0, 0.0, 0.0, {}),
    ("overlay", "sumsq", "hard", 0.06, 0.0, 0.0, {}),
    ("overlay", "meansq", "hard", 0.0, 0.0, 0.0, {}),
    ("overlay", "minssq", "random", 0.06, 0.0, 0.0, {}),
    ("concat", "sumsq", "hard", 0.06, 0.0, 0.0, {}),
    ("concat", "meansq", "random", 0.0, 0.3, 0.4, {}),
    ("overlay", "sumsq", "hard", 0.06, 0.2, 0.3, {}),
    ("none", "sumsq", "hybrid", 0.0, 0.0, 0.0, {}),
    ("none", "sumsq", "hybrid", 0.06, 0.2, 0.3, {"blurs": 2}),
    ("none", "meansq", "hybrid", 0.06, 0.0, 0.0, {"hybrid_different_class": True}),
    ("none", "minssq", "hybrid", 0.0, 0.0, 0.0, {"blurs": 0}),
]
# two locally connected layers (3x3 fields on the 4x5 image: 2 channels, then 1 per
# location; stride 2 in the second would leave a 2x3 map) under a dense top layer
LOCAL = {"hidden": (40, 6, 5), "local_kernels": (3, 3), "local_strides": (1, 2)}
# 5x5 fields at stride 1: the layer's fast path runs on 2 x 2 tiles (ragged on the 4x5 map),
# its weights laid into tile matrices anew after every optimizer step
LOCAL_TILED = {"hidden": (40, 6), "local_kernels": (5,), "local_strides": (1,)}
CASES += [
    ("none", "sumsq", "hybrid", 0.06, 0.0, 0.0, {}, LOCAL_TILED),
    ("none", "sumsq", "hybrid", 0.06, 0.0, 0.0, {}, LOCAL),
    ("none", "meansq", "hybrid", 0.06, 0.2, 0.3, {"blurs": 1}, LOCAL),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(map(str, c[:6])) + ("-local" if len(c) > 7 else "")
)
def test_fast_step_equals_autograd_reference(case):
    mode, kind, negatives, peer, p_in, p_hid, extra, *arch = case
    arch = arch[0] if arch else {}
    cfg = FFTrainConfig(
        negatives=negatives, input_dropout=p_in, dropout=p_hid, weight_cost=0.01, **extra
    )
    x, y = batch()
    fast = FFTrainer(net_for(mode, kind, peer, **arch), cfg)
    ref = ReferenceTrainer(net_for(mode, kind, peer, **arch), cfg)
    for seed in range(3):  # three steps: the running means and the optimizer state evolve
        s_fast, g_fast, b_fast = grads(fast, x, y, seed)
        s_ref, g_ref, b_ref = grads(ref, x, y, seed)
        torch.testing.assert_close(s_fast, s_ref, rtol=0, atol=1e-12)
        for a, b in zip(g_fast, g_ref, strict=True):
            assert (a is None) == (b is None)
            if a is not None:  # float64: float32 rounding would show at 1e-7
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(b_fast, b_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        fast.apply_gradients()
        ref.apply_gradients()
    for a, b in zip(fast.net.parameters(), ref.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    fresh = net_for(mode, kind, **arch)
    for a, b in zip(fast.net.layers, fresh.layers, strict=True):
        assert not torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("mode", ["overlay", "none"])
def test_fused_step_equals_reference_step(mode):
    """Weight gradients folded into SmoothedSGD by GEMM = the reference's .grad + step."""
    negatives = "hard" if mode == "overlay" else "hybrid"
    cfg = FFTrainConfig(negatives=negatives, weight_cost=0.01)
    fast = FFTrainer(net_for(mode, peer=0.06), cfg)
    ref = ReferenceTrainer(net_for(mode, peer=0.06), cfg)
    assert fast.fused
    for seed in range(4):
        x, y = batch(seed=seed)
        fast.step(x, y, torch.Generator().manual_seed(seed))
        ref.step(x, y, torch.Generator().manual_seed(seed))
    assert fast.net.layers[0].weight.grad is None  # nothing went through .grad
    for a, b in zip(fast.net.parameters(), ref.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["overlay", "none"])
def test_greedy_layer_learns_alone_in_both_trainers(mode):
    negatives = "random" if mode == "overlay" else "hybrid"
    cfg = FFTrainConfig(negatives=negatives, layer_schedule="greedy")
    x, y = batch()
    for cls in (FFTrainer, ReferenceTrainer):
        net = net_for(mode, peer=0.06)
        before = [m.weight.detach().clone() for m in net.layers]
        rm = [net.running_mean(i).clone() for i in range(3)]
        cls(net, cfg).step(x, y, torch.Generator().manual_seed(0), active=range(1, 2))
        moved = [not torch.equal(b, m.weight) for b, m in zip(before, net.layers, strict=True)]
        assert moved == [False, True, False]
        kept = [torch.equal(r, net.running_mean(i)) for i, r in enumerate(rm)]
        assert kept == [True, False, True]


def test_a_new_negative_source_is_a_registered_class():
    """A source registered by name reaches the trainer through the config, no trainer edit."""

    @register
    class Shuffled(NegativeSource):  # each image's pixels in one fixed random order
        name, labelled = "test-shuffled", False

        def __init__(self, image_shape, blurs, different_class):
            pass

        def draw(self, x, y, generator, probs=None):
            perm = torch.randperm(x.shape[1], generator=generator)
            return NegativeBatch(x[:, perm], None)

    try:
        cfg = FFTrainConfig(negatives="test-shuffled")
        x, y = batch()
        stats = []
        for cls in (FFTrainer, ReferenceTrainer):
            tr = cls(net_for("none"), cfg)
            stats.append(grads(tr, x, y, 0)[0])
        torch.testing.assert_close(stats[0], stats[1], rtol=0, atol=1e-12)
    finally:
        del NEGATIVE_SOURCES["test-shuffled"]


def test_mode_and_source_must_agree():
    with pytest.raises(ValueError, match="needs model.label_mode=none"):
        FFTrainer(net_for("overlay"), FFTrainConfig(negatives="hybrid"))
    with pytest.raises(ValueError, match="needs model.label_mode=overlay or concat"):
        FFTrainer(net_for("none"), FFTrainConfig(negatives="hard"))
    with pytest.raises(ValueError, match="needs model.image_shape"):
        FFTrainer(net_for("none", image_shape=()), FFTrainConfig(negatives="hybrid"))


@pytest.mark.parametrize("mode", ["overlay", "none"])
def test_forward_returns_activities_and_goodness(mode):
    net = net_for(mode, kind="meansq")
    x, y = batch()
    labels = y if mode == "overlay" else None
    seen = []
    handle = net.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = net(x, labels)
    handle.remove()
    assert seen == [torch.Size([9, 6])]  # hooks on the layers see the forward pass
    assert [tuple(a.shape) for a in out.activities] == [(9, 7), (9, 6), (9, 5)]
    want = torch.stack([a.square().mean(1) for a in net.activities(x, labels)], 1)
    torch.testing.assert_close(out.goodness, want, rtol=0, atol=1e-14)
    if mode == "none":
        with pytest.raises(ValueError, match="takes no labels"):
            net(x, y)


@pytest.mark.parametrize("mode", ["overlay", "none"])
def test_unit_activity_counts_dead_and_always_on_units(mode):
    """Layer 0, 7 units: unit 0 is forced off (z = -1), unit 1 on (z = +1), the rest vary."""
    net = net_for(mode)
    with torch.no_grad():
        for unit, bias in ((0, -1.0), (1, 1.0)):
            net.layers[0].weight[unit] = 0.0
            net.layers[0].bias[unit] = bias
    negatives = "hard" if mode == "overlay" else "hybrid"
    tr = FFTrainer(net, FFTrainConfig(negatives=negatives, lr=1e-12, batch_size=9))
    x, y = batch(n=18)
    tr.train_epoch(x, y, 0, torch.Generator().manual_seed(0))
    acts = net.activities(x, y) if mode == "overlay" else net.activities(x)
    want = [(float((a > 0).sum(0).eq(0).double().mean()), float((a > 0).all(0).double().mean()))
            for a in acts]  # fmt: skip
    got = tr.unit_activity()
    assert got[0][0] >= 1 / 7 and got[0][1] >= 1 / 7  # the forced units
    assert got == want  # lr ~ 0: the epoch saw the same net; fractions are k / H exactly
