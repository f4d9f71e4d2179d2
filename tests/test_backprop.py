"""The backprop twin: same input and layers as FF, its optimizer, a short real-data run."""

import pytest
import torch

from fflab import presets, runs
from fflab.backprop import BPNet, BPNetConfig, BPTrainConfig, make_optimizer, sgd_step_
from fflab.ff.model import FFNet, FFNetConfig
from fflab.optim import MomentumSGD


def test_twin_sees_ffs_neutral_input_through_the_same_layers():
    """Same seed, same hidden sizes: BPNet's hidden activities are FF's neutral-label pass."""
    hidden = (12, 9, 7)
    ff = FFNet(
        FFNetConfig(in_features=30, num_classes=4, hidden=hidden, label_mode="overlay"),
        torch.Generator().manual_seed(3),
    )
    bp = BPNet(
        BPNetConfig(in_features=30, num_classes=4, hidden=hidden, label_input="neutral"),
        torch.Generator().manual_seed(3),
    )
    ff, bp = ff.double(), bp.double()
    x = torch.rand(5, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    acts = []
    bp.layers[-1].register_forward_hook(lambda m, i, o: acts.append(torch.relu(o)))
    bp(x)
    torch.testing.assert_close(acts[0], ff.neutral_activities(x)[-1], rtol=0, atol=1e-12)


def test_autograd_step_equals_torch_sgd():
    """The optimizer fflab builds, fed by autograd, takes torch.optim.SGD's steps."""
    nets = [
        BPNet(BPNetConfig(in_features=30, hidden=(8, 6)), torch.Generator().manual_seed(0)).double()
        for _ in range(2)
    ]
    cfg = BPTrainConfig(weight_cost=0.01)
    ours = make_optimizer(nets[0], cfg)
    assert isinstance(ours, MomentumSGD)
    theirs = torch.optim.SGD(nets[1].parameters(), lr=cfg.lr, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.rand(4, 30, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=g)
        for net, opt in zip(nets, (ours, theirs), strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_short_real_mnist_bp_run_reaches_bar(tmp_path, mnist_dir):
    """mnist-bp-hinton-code for one epoch: test error below 5% (measured about 3.3%)."""
    c = presets.resolve("mnist-bp-hinton-code", {"train": {"epochs": "1"}})
    s = runs.train(
        c, tmp_path / "r", device=torch.device("cpu"), data_dir=mnist_dir, progress=False
    )
    assert s["test_error"] < 5.0, s
    assert s["train_error"] < 5.0, s


@pytest.mark.parametrize(
    ("label_input", "momentum", "weight_cost"),
    [("neutral", 0.9, 0.0), ("none", 0.9, 0.01), ("neutral", 0.0, 0.003)],
)
def test_hand_derived_step_equals_autograd(label_input, momentum, weight_cost):
    """sgd_step_ takes the steps autograd + torch's SGD take, in float64, and returns the loss."""
    cfg = BPNetConfig(in_features=30, num_classes=4, hidden=(9, 7, 5), label_input=label_input)
    nets = [BPNet(cfg, torch.Generator().manual_seed(0)).double() for _ in range(2)]
    t = BPTrainConfig(lr=0.3, momentum=momentum, weight_cost=weight_cost)
    opts = [
        torch.optim.SGD(nets[0].parameters(), lr=0.3, momentum=momentum, weight_decay=weight_cost),
        make_optimizer(nets[1], t),
    ]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.rand(6, 30, generator=g, dtype=torch.float64)
        x[0] = 0.0  # an all-zero input row goes through the eps of the RMS normalization
        y = torch.randint(0, 4, (6,), generator=g)
        loss = torch.nn.functional.cross_entropy(nets[0](x), y)
        opts[0].zero_grad()
        loss.backward()
        opts[0].step()
        torch.testing.assert_close(sgd_step_(nets[1], opts[1], x, y), loss.detach())
    start = BPNet(cfg, torch.Generator().manual_seed(0)).double()
    for a, b, a0 in zip(
        nets[0].parameters(), nets[1].parameters(), start.parameters(), strict=True
    ):
        assert (a - a0).abs().max() > 1e-3  # every parameter moved
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_hand_derived_step_moves_weights_downhill():
    """A hand-derived step on one fixed batch lowers its loss (the gradient's sign is right)."""
    cfg = BPNetConfig(in_features=30, num_classes=4, hidden=(16, 16))
    net = BPNet(cfg, torch.Generator().manual_seed(0)).double()
    opt = make_optimizer(net, BPTrainConfig(lr=0.05, momentum=0.0))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 30, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=g)
    losses = [float(sgd_step_(net, opt, x, y)) for _ in range(5)]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
