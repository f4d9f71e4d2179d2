"""MomentumSGD: every fused form against its plain reference, each convention by hand, and
torch's SGD; FF's SmoothedSGD preset and Hinton's schedule against hand-computed values."""

import copy
import itertools

import pytest
import torch

from fflab import optim
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, make_optimizer
from fflab.optim import (
    CONVENTIONS,
    MomentumSGD,
    SmoothedSGD,
    hinton_lr_factor,
    lr_factor,
    reference_step_,
)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
FORMS = ("grad", "fold", "product", "columns", "mixed")


def _fold(opt, form, w, bias, a, b):
    """Hand W's gradient a @ b (R, C) and the bias's gradient (R,) to ``opt`` in ``form``."""
    gw, gb = a @ b, a.sum(1)
    if form == "grad":
        w.grad, bias.grad = gw, gb
    elif form == "fold":
        opt.fold_(w, gw)
        opt.fold_(bias, gb)
    elif form == "product":
        opt.fold_product_(w, a, b)
        opt.fold_(bias, gb)
    elif form == "columns":  # blocks of columns, each its own way
        opt.fold_product_(w, a, b[:, :2], slice(None, 2))
        opt.fold_(w, gw[:, 2:4], slice(2, 4))
        opt.fold_product_(w, a, b[:, 4:], slice(4, None))
        opt.fold_(bias, gb[:3], slice(None, 3))
        opt.fold_(bias, gb[3:], slice(3, None))
    else:  # mixed: W folded, the bias through .grad, in the same step
        opt.fold_product_(w, a, b)
        bias.grad = gb


@pytest.mark.parametrize("fused_kernel", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
def test_every_form_equals_the_reference(flags, weight_decay, fused_kernel, monkeypatch):
    """Each way of handing over a gradient takes the steps of reference_step_, in float64, for
    every convention, with weight decay on and off and two groups of their own settings;
    the third step changes lr and momentum (a schedule)."""
    monkeypatch.setattr(optim, "FUSED_SGD", fused_kernel)  # torch's fused kernel or foreach
    conv = dict(zip(CONVENTIONS, flags, strict=True))
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 6, generator=g, dtype=F64)
    b0 = torch.randn(5, generator=g, dtype=F64)
    grads = [
        (torch.randn(5, 3, generator=g, dtype=F64), torch.randn(3, 6, generator=g, dtype=F64))
        for _ in range(3)
    ]
    settings = [
        {"lr": 0.3, "momentum": 0.7, "weight_decay": weight_decay},
        {"lr": 0.1, "momentum": 0.5, "weight_decay": weight_decay / 2},
    ]
    # the reference: plain loops on clones
    ref_w, ref_b = w0.clone(), b0.clone()
    ref_v = [torch.zeros_like(ref_w), torch.zeros_like(ref_b)]
    for i, (a, b) in enumerate(grads):
        for s in settings if i == 2 else ():
            s.update(lr=s["lr"] / 2, momentum=0.9)
        for p, grad, v, s in zip((ref_w, ref_b), (a @ b, a.sum(1)), ref_v, settings, strict=True):
            reference_step_([p], [grad], [v], **s, **conv)
    for form in FORMS:
        w, bias = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        settings[0].update(lr=0.3, momentum=0.7)
        settings[1].update(lr=0.1, momentum=0.5)
        groups = [{"params": [w], **settings[0]}, {"params": [bias], **settings[1]}]
        opt = MomentumSGD(groups, lr=1.0, **conv)
        for i, (a, b) in enumerate(grads):
            for group in opt.param_groups if i == 2 else ():
                group.update(lr=group["lr"] / 2, momentum=0.9)
            w.grad = bias.grad = None
            _fold(opt, form, w, bias, a, b)
            opt.step()
        for p, ref, v in zip((w, bias), (ref_w, ref_b), ref_v, strict=True):
            torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-13, msg=form)
            torch.testing.assert_close(opt.state[p]["velocity"], v, rtol=0, atol=1e-13, msg=form)


# p = [2, -1], lr 0.5, momentum 0.9, weight decay 0.1; gradient [1, 4], then [0, 0]
BY_HAND = {
    # torch: v = g + 0.1 p = [1.2, 3.9], p -= 0.5 v; v = 0.9 v + 0.1 p, p -= 0.5 v
    "torch classic": ({}, [1.4, -2.95], [0.79, -4.5575]),
    # FF: v = 0.1 g = [0.1, 0.4], p = 0.95 p - 0.5 v; v = 0.9 v, p = 0.95 p - 0.5 v
    "Hinton FF": (
        {"smoothing": True, "decay_in_velocity": False},
        [1.85, -1.15],
        [1.7125, -1.2725],
    ),
    # RBM/BM ascent: v = 0.5 (g - 0.1 p) = [0.4, 2.05], p += v; v = 0.9 v - 0.05 p, p += v
    "Hinton RBM": ({"lr_in_velocity": True, "maximize": True}, [2.4, 1.05], [2.64, 2.8425]),
}


@pytest.mark.parametrize("form", ["grad", "fold"])
@pytest.mark.parametrize("convention", list(BY_HAND))
def test_two_steps_by_hand(convention, form):
    options, first, second = BY_HAND[convention]
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=F64))
    opt = MomentumSGD([p], lr=0.5, momentum=0.9, weight_decay=0.1, **options)
    for grad, expected in (([1.0, 4.0], first), ([0.0, 0.0], second)):
        grad = torch.tensor(grad, dtype=F64)
        if form == "grad":
            p.grad = grad
        else:
            opt.fold_(p, grad)
        opt.step()
        torch.testing.assert_close(
            p.detach(), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-15
        )


def test_defaults_take_torch_sgds_steps():
    """The default convention is torch.optim.SGD's classic momentum, weight decay included."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=F64)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = MomentumSGD(ps, lr=0.2, momentum=0.8, weight_decay=0.03)
    theirs = torch.optim.SGD(qs, lr=0.2, momentum=0.8, weight_decay=0.03)
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn(4, 3, generator=g, dtype=F64)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_loads_the_velocity_of_older_checkpoints():
    """A state saved as torch SGD's momentum_buffer (or SmoothedSGD's inc) is the velocity."""
    p, q = (torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64)) for _ in range(2))
    theirs = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([1.0, -1.0], dtype=F64)
    theirs.step()
    ours = MomentumSGD([q], lr=0.1, momentum=0.9)
    with torch.no_grad():
        q.copy_(p)
    groups = ours.state_dict()["param_groups"]  # as checkpoint.unflatten_optimizer does
    saved = copy.deepcopy(theirs.state_dict()["state"])  # as from a file: not shared
    ours.load_state_dict({"state": saved, "param_groups": groups})
    torch.testing.assert_close(ours.state[q]["velocity"], theirs.state[p]["momentum_buffer"])
    q.grad = p.grad.clone()
    theirs.step()
    ours.step()
    torch.testing.assert_close(q, p, rtol=0, atol=0)
    ours.load_state_dict({"state": {0: {"inc": torch.ones(2, dtype=F64)}}, "param_groups": groups})
    assert torch.equal(ours.state[q]["velocity"], torch.ones(2, dtype=F64))


def test_bad_settings_raise():
    p = torch.nn.Parameter(torch.zeros(2))
    for kwargs, match in (
        ({"lr": -0.1}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
        ({"lr": 0.1, "smoothing": 1}, "smoothing"),
    ):
        with pytest.raises(ValueError, match=match):
            MomentumSGD([p], **kwargs)
    with pytest.raises(ValueError, match="momentum"):  # per group too
        MomentumSGD([{"params": [p], "momentum": -0.5}], lr=0.1)
    opt = MomentumSGD([p], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.fold_(torch.zeros(2), torch.ones(2))


@pytest.mark.parametrize("fused_kernel", [True, False])
def test_smoothed_sgd_two_steps_by_hand(fused_kernel, monkeypatch):
    monkeypatch.setattr(optim, "FUSED_SGD", fused_kernel)  # torch's fused kernel or foreach
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    opt = SmoothedSGD([p], lr=0.5, momentum=0.9, weight_decay=0.1)
    p.grad = torch.tensor([1.0, 4.0], dtype=torch.float64)
    opt.step()
    # inc = 0.1 g = [0.1, 0.4];  p = p (1 - 0.5 * 0.1) - 0.5 inc
    expected = torch.tensor([2.0 * 0.95 - 0.05, -1.0 * 0.95 - 0.2], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
    p.grad = torch.tensor([0.0, 0.0], dtype=torch.float64)
    opt.step()
    # inc = 0.9 inc = [0.09, 0.36]
    expected = expected * 0.95 - 0.5 * torch.tensor([0.09, 0.36], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)


def test_folded_product_by_hand():
    """fold_product_ + fold_ on column blocks = the same gradient through .grad, by hand."""
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64))
    opt = SmoothedSGD([p], lr=0.5, momentum=0.9, weight_decay=0.1)
    a = torch.tensor([[1.0], [2.0]], dtype=torch.float64)  # (2, 1)
    b = torch.tensor([[3.0, -1.0]], dtype=torch.float64)  # (1, 2): a @ b = [[3, -1], [6, -2]]
    expected = p.detach().clone()
    for _ in range(2):  # the second step checks that inc carries over
        opt.fold_product_(p, a, b, slice(1, None))
        opt.fold_(p, torch.tensor([[10.0], [20.0]], dtype=torch.float64), slice(None, 1))
        assert p.grad is None
        opt.step()
    g = torch.tensor([[10.0, 3.0, -1.0], [20.0, 6.0, -2.0]], dtype=torch.float64)
    inc = torch.zeros_like(g)
    for _ in range(2):
        inc = 0.9 * inc + 0.1 * g
        expected = expected * (1 - 0.5 * 0.1) - 0.5 * inc
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14)
    opt.step()  # nothing folded and no .grad: nothing moves
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14)


def test_hinton_schedule_by_hand():
    assert [hinton_lr_factor(e, 4) for e in range(4)] == [1.0, 1.0, 0.75, 0.25]
    assert [hinton_lr_factor(e, 5) for e in range(5)] == [1.0, 1.0, 1.0, 0.6, 0.2]
    assert lr_factor(3, 4, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 4, "cosine")


def test_default_weight_cost_shrinks_like_hintons_code():
    """His code takes weight cost 0.001 at lr 0.01: weights shrink by 1e-5 per step. fflab's
    lr is half his (it differentiates the true loss), so its default cost must be double."""
    net = FFNet(FFNetConfig(hidden=(8, 8)), generator=torch.Generator().manual_seed(0)).double()
    opt = make_optimizer(net, FFTrainConfig())
    w0 = [m.weight.detach().clone() for m in net.layers]
    for m in net.layers:
        m.weight.grad = torch.zeros_like(m.weight)
    opt.step()
    for m, w in zip(net.layers, w0, strict=True):
        shrink = 1 - m.weight.detach() / w  # 1e-5 here; 5e-6 with the old default 0.001
        torch.testing.assert_close(shrink, torch.full_like(w, 0.01 * 0.001), rtol=1e-6, atol=0)
