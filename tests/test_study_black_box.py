"""Black boxes between FF layers: each box's forward by hand, the boxed FF net's forward paths
and reference gradients against autograd with the box output as a constant, the
straight-through estimator by hand, and the black-box study end to end on digits."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fflab.backprop import BPNet, BPNetConfig
from fflab.ff.boxes import LookupTable, NumpyFunction, Quantizer, SignedPermutation
from fflab.ff.functional import ff_loss, goodness, rms_normalize
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.reference import ReferenceTrainer
from fflab.ff.train import FFTrainConfig, FFTrainer
from fflab.negatives import make_source
from fflab.studies import StudyContext, run_study
from fflab.studies.black_box_nets import BoxedBPNet, make_boxes, through_box

F64 = torch.float64


# -- the boxes by hand -------------------------------------------------------------------------
def test_quantizer_levels_by_hand():
    q = Quantizer()  # 4 bits on [0, 4]: levels k * 4/15
    x = torch.tensor([-1.0, 0.0, 0.13, 0.14, 1.0, 3.9, 4.0, 10.0], dtype=F64)
    # (x - 0) / (4/15) = -3.75, 0, 0.4875, 0.525, 3.75, 14.625, 15, 37.5 -> 0 0 0 1 4 15 15 15
    want = torch.tensor([0, 0, 0, 1, 4, 15, 15, 15], dtype=F64) * 4 / 15
    assert torch.allclose(q(x), want, rtol=0, atol=1e-14) and q(x).dtype == F64
    r = q(torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 6 - 1)
    assert len(torch.unique(r)) == 16  # every level used, no other value
    one_bit = Quantizer(bits=1, lo=-1, hi=1)
    assert one_bit(torch.tensor([-0.3, -0.01, 0.2, 5.0])).tolist() == [-1, -1, 1, 1]
    with pytest.raises(ValueError, match="hi > lo"):
        Quantizer(4, 1.0, 1.0)


def test_signed_permutation_is_orthogonal_and_its_inverse_undoes_it():
    box = SignedPermutation(20, torch.Generator().manual_seed(3))
    m = box(torch.eye(20, dtype=F64))  # box(x) = x @ m
    assert ((m != 0).sum(0) == 1).all() and ((m != 0).sum(1) == 1).all()
    assert set(m[m != 0].tolist()) == {-1.0, 1.0}  # signs of both kinds occur
    assert torch.equal(m @ m.T, torch.eye(20, dtype=F64))
    assert not torch.equal(box.perm, torch.arange(20))
    x = torch.randn(5, 20, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(box(x), x @ m)
    assert torch.equal(box.inverse(box(x)), x)
    # the exact vector-Jacobian product is the transpose (autograd through the indexing)
    g = torch.randn(5, 20, dtype=F64)
    xr = x.clone().requires_grad_()
    (box(xr) * g).sum().backward()
    assert torch.equal(box.vjp(g), xr.grad) and torch.allclose(box.vjp(g), g @ m.T)
    with pytest.raises(ValueError, match="20 units got 3"):
        box(torch.zeros(2, 3))


def test_numpy_box_equals_the_torch_formula_and_leaves_torch():
    box = NumpyFunction(np.tanh)
    x = torch.randn(7, 9, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(box(x), torch.tanh(x), rtol=1e-15, atol=0) and box(x).dtype == F64
    assert box(x.float()).dtype == torch.float32
    assert not box(x.requires_grad_()).requires_grad  # autograd cannot follow the numpy trip
    sq = NumpyFunction(lambda a: np.sqrt(np.abs(a)), "sqrt|a|")
    assert torch.allclose(sq(x), x.abs().sqrt(), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="shape"):
        NumpyFunction(lambda a: a.sum(1))(x)


def test_lookup_table_values_by_hand():
    box = LookupTable(torch.tensor([0.5, -1.0, 2.0, 0.0]), lo=0.0, hi=3.0)  # levels 0, 1, 2, 3
    x = torch.tensor([-5.0, 0.4, 0.6, 1.49, 2.2, 9.0])  # levels 0 0 1 1 2 3
    assert box(x).tolist() == [0.5, 0.5, -1.0, -1.0, 2.0, 0.0]
    g = torch.Generator().manual_seed(0)
    mono, rand = LookupTable.random(g, monotone=True), LookupTable.random(g)
    for t in (mono.table, rand.table):
        assert t.numel() == 256 and 0 <= t.min() and t.max() < 1
    assert (mono.table.diff() >= 0).all() and not (rand.table.diff() >= 0).all()
    # 256 levels on [0, 4]: 4/255 apart; 1.0 is level 63.75 -> 64
    assert rand(torch.tensor([1.0]))[0] == rand.table[64]


# -- a boxed FF net ----------------------------------------------------------------------------
def _net(boxes=None, mode="concat", dtype=F64, seed=0, hidden=(12, 10, 8)):
    cfg = FFNetConfig(in_features=16, num_classes=4, hidden=hidden, label_mode=mode,
                      peer_norm=0.0, head_from=1, score_from=1)  # fmt: skip
    return FFNet(cfg, torch.Generator().manual_seed(seed), boxes).to(dtype)


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 16, generator=g, dtype=F64), torch.randint(0, 4, (n,), generator=g)


def test_identity_boxes_change_nothing_exactly():
    x, y = _batch()
    plain, boxed = _net(), _net([None, nn.Identity()])
    assert not boxed.has_boxes
    pairs = zip(plain.activities(x, y), boxed.activities(x, y), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert torch.equal(plain.label_goodness(x), boxed.label_goodness(x))
    assert torch.equal(plain.head_logits(x), boxed.head_logits(x))
    yn = (y + 1) % 4
    pairs = zip(plain.layer_losses(x, y, yn), boxed.layer_losses(x, y, yn), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    cfg = FFTrainConfig(negatives="hard")
    grads = []
    for net in (plain, boxed):
        ReferenceTrainer(net, cfg).compute_gradients(x, y, torch.Generator().manual_seed(2))
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_every_forward_path_applies_the_boxes():
    x, y = _batch()
    boxes = [Quantizer(4, 0.0, 2.0), NumpyFunction(np.tanh)]
    net = _net(boxes)
    # by hand: layer l + 1 reads rms_normalize(box_l(a_l))
    h, want = net.embed(x, y), []
    for i, layer in enumerate(net.layers):
        want.append(torch.relu(layer(rms_normalize(h))))
        if i < 2:
            h = boxes[i](want[-1])
    got = net.activities(x, y)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(got, want, strict=True))
    assert not torch.allclose(got[1], _net().activities(x, y)[1])  # the boxes matter
    lg = net.label_goodness(x)  # (B, C, L): the shared first-layer path
    for c in range(4):
        full = torch.full_like(y, c)
        g = torch.stack([goodness(a) for a in net.activities(x, full)], 1)
        assert torch.allclose(lg[:, c], g, rtol=1e-9, atol=1e-9)
    neutral = net.activities(x)  # labels None: the neutral label
    for a, b in zip(net.neutral_activities(x), neutral, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert torch.allclose(net.head_logits(x), net.head(net.head_features(neutral)))


def test_reference_gradients_equal_autograd_with_the_box_output_as_a_constant():
    x, y = _batch(8)
    seen = []

    def spy(a):  # a box that records whether autograd could reach through it
        seen.append(a.requires_grad)
        return Quantizer(4, 0.0, 3.0)(a)

    net = _net([spy, LookupTable.random(torch.Generator().manual_seed(4), 16, 0.0, 3.0)])
    with torch.no_grad():
        net.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    cfg = FFTrainConfig(negatives="random")
    ReferenceTrainer(net, cfg).compute_gradients(x, y, torch.Generator().manual_seed(7))
    assert seen and not any(seen)  # the box only ever saw detached activities
    got = {n: p.grad.clone() for n, p in net.named_parameters()}

    # oracle: the same negative labels, each layer's loss on its own, with box outputs
    # computed apart and handed to the layer above as plain constant tensors
    y_neg = make_source("random", num_classes=4).draw(x, y, torch.Generator().manual_seed(7)).y
    hp, hn = net.embed(x, y).clone(), net.embed(x, y_neg).clone()
    for i, layer in enumerate(net.layers):
        ap = torch.relu(layer(rms_normalize(hp)))
        an = torch.relu(layer(rms_normalize(hn)))
        loss = ff_loss(goodness(ap), goodness(an), net.theta(i))
        want = torch.autograd.grad(loss, [layer.weight, layer.bias])
        assert torch.allclose(got[f"layers.{i}.weight"], want[0], rtol=1e-12, atol=1e-14)
        assert torch.allclose(got[f"layers.{i}.bias"], want[1], rtol=1e-12, atol=1e-14)
        if i < 2:
            with torch.no_grad():
                hp, hn = net.box(i, ap).clone(), net.box(i, an).clone()
    # the model's own per-layer losses give the same gradients
    net.zero_grad()
    sum(net.layer_losses(x, y, y_neg)).backward()
    for i, layer in enumerate(net.layers):
        assert torch.allclose(layer.weight.grad, got[f"layers.{i}.weight"], rtol=1e-12, atol=1e-14)
    # the head: cross-entropy of the neutral pass (through the boxes) only
    feats = net.head_features(net.activities(x)).detach()
    want = torch.autograd.grad(
        torch.nn.functional.cross_entropy(net.head(feats), y), [net.head.weight]
    )[0]
    assert torch.allclose(got["head.weight"], want, rtol=1e-12, atol=1e-14)


def _boxes():
    """Three kinds of box in the two gaps: a numpy function, then a signed permutation."""
    return [NumpyFunction(np.tanh), SignedPermutation(10, torch.Generator().manual_seed(3))]


BOXED_CASES = [
    # (label_mode, negatives, peer_norm, input_dropout, dropout, step_schedule)
    ("concat", "hard", 0.0, 0.0, 0.0, "forward_first"),
    ("overlay", "random", 0.06, 0.2, 0.3, "forward_first"),
    ("concat", "hard", 0.06, 0.0, 0.3, "layerwise"),
    ("none", "hybrid", 0.06, 0.0, 0.0, "forward_first"),
    ("none", "hybrid", 0.0, 0.2, 0.3, "layerwise"),
]


@pytest.mark.parametrize("case", BOXED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fast_step_through_boxes_equals_the_reference(case):
    """The fast trainer applies the boxes as the autograd reference does (float64, three
    steps), and the boxes change the gradients of the layers above them."""
    mode, negatives, peer, p_in, p_hid, schedule = case

    def net():
        cfg = FFNetConfig(in_features=16, num_classes=4, hidden=(12, 10, 8), label_mode=mode,
                          peer_norm=peer, head_from=1, score_from=1,
                          image_shape=(1, 4, 4) if mode == "none" else ())  # fmt: skip
        return FFNet(cfg, torch.Generator().manual_seed(0), _boxes()).to(F64)

    cfg = FFTrainConfig(negatives=negatives, input_dropout=p_in, dropout=p_hid,
                        weight_cost=0.01, step_schedule=schedule)  # fmt: skip
    fast, ref = FFTrainer(net(), cfg), ReferenceTrainer(net(), cfg)
    fast.fused = False  # .grad written, to compare
    x, y = _batch(8)
    for seed in range(3):
        s_fast = fast.compute_gradients(x, y, torch.Generator().manual_seed(seed))
        s_ref = ref.compute_gradients(x, y, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(s_fast, s_ref, rtol=0, atol=1e-12)
        for (name, a), b in zip(fast.net.named_parameters(), ref.net.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
        fast.apply_gradients()
        ref.apply_gradients()
    for a, b in zip(fast.net.buffers(), ref.net.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    plain = FFTrainer(FFNet(net().config, torch.Generator().manual_seed(0)).to(F64), cfg)
    plain.fused = False
    plain.compute_gradients(x, y, torch.Generator().manual_seed(0))
    boxed = FFTrainer(net(), cfg)
    boxed.fused = False
    boxed.compute_gradients(x, y, torch.Generator().manual_seed(0))
    w_plain, w_boxed = plain.net.layers[1].weight.grad, boxed.net.layers[1].weight.grad
    assert not torch.allclose(w_plain, w_boxed)  # the boxes reach the layer above


def test_boxes_must_fill_the_gaps_and_the_pipeline_refuses_them():
    with pytest.raises(ValueError, match="2 for 3 layers, got 1"):
        _net([Quantizer()])
    boxed = _net([Quantizer(), None])
    assert boxed.has_boxes
    with pytest.raises(ValueError, match="PipelineFFTrainer does not apply the boxes"):
        boxed.require_no_boxes("PipelineFFTrainer")
    _net().require_no_boxes("PipelineFFTrainer")
    _net([None, None]).require_no_boxes("PipelineFFTrainer")
    # buffers of the boxes move with the net and are saved with it
    perm = _net([SignedPermutation(12, torch.Generator().manual_seed(0)), None])
    assert "between.0.perm" in perm.state_dict()


# -- backprop through the boxes ----------------------------------------------------------------
def test_straight_through_gradients_by_hand():
    a = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    w = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    q = Quantizer()
    out = through_box(q, a)
    assert torch.equal(out, q(a.detach()))
    (out * w).sum().backward()
    assert torch.equal(a.grad, w)  # STE: identity Jacobian
    a.grad = None
    (through_box(NumpyFunction(np.tanh), a) * w).sum().backward()
    assert torch.equal(a.grad, w)  # not tanh's derivative: the box is opaque
    a.grad = None
    perm = SignedPermutation(6, torch.Generator().manual_seed(2))
    (through_box(perm, a) * w).sum().backward()
    assert torch.equal(a.grad, perm.inverse(w))  # the permutation's exact transpose


def test_boxed_backprop_net_against_the_plain_twin_and_the_detach_trick():
    cfg = BPNetConfig(in_features=16, num_classes=4, hidden=(10, 8, 6), label_input="none")
    x, y = _batch(5)
    plain = BPNet(cfg, torch.Generator().manual_seed(0)).double()
    same = BoxedBPNet(cfg, torch.Generator().manual_seed(0), [None, None]).double()
    assert torch.equal(plain(x), same(x))
    boxes = [Quantizer(4, 0.0, 3.0), LookupTable.random(torch.Generator().manual_seed(1), 32)]
    net = BoxedBPNet(cfg, torch.Generator().manual_seed(0), boxes).double()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    # independent STE: h = a + (box(a) - a).detach() (value box(a), Jacobian identity)
    h = x
    for i, layer in enumerate(plain.layers):
        a = torch.relu(layer(rms_normalize(h)))
        h = a + (boxes[i](a) - a).detach() if i < 2 else a
    torch.nn.functional.cross_entropy(plain.out(rms_normalize(h)), y).backward()
    for p, q in zip(net.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-15)
    assert plain.layers[0].weight.grad.abs().sum() > 0
    # plain autograd: integer levels (quantizer, table) leave no path back to the layers below
    auto = BoxedBPNet(cfg, torch.Generator().manual_seed(0), boxes, gradient="autograd").double()
    torch.nn.functional.cross_entropy(auto(x), y).backward()
    assert auto.layers[0].weight.grad is None and auto.layers[1].weight.grad is None
    assert auto.layers[2].weight.grad.abs().sum() > 0
    perm = [SignedPermutation(10, torch.Generator().manual_seed(0)), None]
    exact = BoxedBPNet(cfg, None, perm, gradient="autograd").double()
    torch.nn.functional.cross_entropy(exact(x), y).backward()
    assert exact.layers[0].weight.grad.abs().sum() > 0  # the permutation is differentiable


def test_make_boxes_kinds():
    g = torch.Generator().manual_seed(0)
    assert make_boxes("quantize4", [5, 6, 7], g)[0].levels == 16
    perms = make_boxes("permutation", [5, 6, 7], g)
    assert [p.perm.numel() for p in perms] == [5, 6]
    with pytest.raises(ValueError, match="unknown box"):
        make_boxes("nope", [5, 6], g)


# -- the study end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(study_digits):
    return study_digits


def test_black_box_study_on_digits(tmp_path, digits, one_thread):
    settings = {
        "model": {"hidden": [64, 64]},
        "train": {"epochs": 8},
        "ff.model": {"score_from": 0},
        "ff.train": {"lr": 0.02},
        "bp.train": {"lr": 0.05},
    }
    ctx = StudyContext(out_dir=tmp_path / "bb", quick=True, data=digits, settings=settings)
    out = run_study("black-box", ctx)
    boxes = out["boxes"]
    assert list(boxes) == ["none", "quantize4", "permutation", "numpy-tanh", "lut-monotone",
                           "lut-random"]  # fmt: skip
    assert out["hidden"] == [64, 64] and out["epochs"] == 8 and out["n_test"] == 397
    assert boxes["none"]["ff"]["test_error_goodness"] < 20
    assert boxes["none"]["bp-surrogate"]["test_error"] < 15
    assert boxes["quantize4"]["ff"]["test_error_goodness"] < 30  # FF learns through the box
    assert boxes["permutation"]["bp-surrogate"]["gradient"] == "exact transpose"
    assert boxes["numpy-tanh"]["bp-surrogate"]["gradient"] == "STE (identity)"
    assert boxes["permutation"]["bp-autograd"] == {"same_as": "bp-surrogate"}
    for kind, e in boxes.items():
        assert len(e["ff"]["loss"]) == 8 and 0 <= e["ff"]["box_inputs"]["zero"] <= 1, kind
    report = (tmp_path / "bb" / "report.md").read_text()
    assert "## Answer" in report and "| lut-random |" in report
    assert (tmp_path / "bb" / "errors.png").stat().st_size > 5000
    assert json.loads((tmp_path / "bb" / "results.json").read_text())["study"] == "black-box"
    # a second call reuses every finished net; other settings in the same directory refuse
    again = run_study("black-box", ctx)
    assert again["boxes"]["lut-random"]["ff"] == boxes["lut-random"]["ff"]
    other = StudyContext(out_dir=tmp_path / "bb", quick=True, data=digits,
                         settings={**settings, "train": {"epochs": 2}})  # fmt: skip
    with pytest.raises(ValueError, match="other settings"):
        run_study("black-box", other)
