"""The smoothed-gradient optimizer and Hinton's schedule against hand-computed values."""

import pytest
import torch

from fflab import optim
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, make_optimizer
from fflab.optim import SmoothedSGD, hinton_lr_factor, lr_factor


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
