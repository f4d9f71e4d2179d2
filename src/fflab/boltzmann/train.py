"""One epoch of RBM training with CD-k or PCD and momentum SGD (no autograd).

The update follows Hinton's practical guide: velocity = momentum * velocity
+ lr * (grad - weight_decay * W) with weight decay on W only, then param += velocity.
The caller owns the velocity dict (checkpoint it with the model to resume exactly);
:func:`momentum_schedule` gives the guide's 0.5 -> 0.9 switch after 5 epochs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_batch, check_generator, check_unit_interval, check_units
from .rbm import RBM, cd_gradient, visible_probs

__all__ = ["rbm_train_epoch", "sgd_momentum_step_", "momentum_schedule"]

# The monitored values (reconstruction error, free energy of the data) cost passes the update
# does not need (PCD's reconstruction a whole down-pass): they are taken on 1 batch in 10.
MONITOR_EVERY = 10


def momentum_schedule(
    epoch: int, *, initial: float = 0.5, final: float = 0.9, switch_epoch: int = 5
) -> float:
    """Momentum for a 0-based epoch: ``initial`` before ``switch_epoch``, then ``final``."""
    return initial if epoch < switch_epoch else final


@torch.no_grad()
def sgd_momentum_step_(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    velocity: dict[str, Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    decayed: tuple[str, ...] = ("W",),
    products: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> None:
    """In-place ascent step: v = m v + lr (g - wd p) (wd only on ``decayed``); p += v.

    ``products`` gives gradients as factor pairs ``(a, b)`` with g = a @ b instead of in
    ``grads``; they are folded into the velocity by one GEMM (``beta = m``), which spares
    writing g and two passes over it.
    """
    products = products or {}
    names = list(params)
    for name in names:
        if name not in velocity:
            velocity[name] = torch.zeros_like(params[name])
    dense = [n for n in names if n not in products]
    vels = [velocity[n] for n in dense]
    torch._foreach_mul_(vels, momentum)
    torch._foreach_add_(vels, [grads[n] for n in dense], alpha=lr)
    for name, (a, b) in products.items():
        velocity[name].addmm_(a, b, beta=momentum, alpha=lr)
    if weight_decay:
        for name in (n for n in decayed if n in params):
            velocity[name].add_(params[name], alpha=-lr * weight_decay)
    torch._foreach_add_([params[n] for n in names], [velocity[n] for n in names])


def _check_float(value: float, name: str, lo: float, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (value >= lo and (hi is None or value <= hi)):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return float(value)


@torch.no_grad()
def rbm_train_epoch(
    rbm: RBM,
    data: Tensor,
    *,
    batch_size: int = 100,
    lr: float = 0.05,
    momentum: float = 0.5,
    weight_decay: float = 2e-4,
    k: int = 1,
    persistent: bool = False,
    generator: torch.Generator,
    velocity: dict[str, Tensor] | None = None,
    shuffle: bool = True,
    on_batch: Callable[[int, Callable[[], dict[str, float]]], None] | None = None,
) -> dict[str, float]:
    """Train ``rbm`` in place for one pass over ``data`` (N, V) in minibatches.

    persistent=False: CD-k; True: PCD-k with ``batch_size`` chains in the RBM's buffers.
    velocity: momentum buffers keyed by parameter name, updated in place; None starts
    from zero (so pass the same dict every epoch to carry momentum across epochs).
    A last partial batch is used as is. ``data`` is cast to the RBM's dtype per batch
    and is never modified.

    Returns, as means over the samples of every 10th batch (the first included):
    ``reconstruction_error`` (squared error per sample between v and p(v | h), with
    h ~ p(h | v) for CD and h = p(h | v) for PCD, whose chains do not start at the data)
    and ``free_energy`` (F(v) before the batch's update); and ``samples``, the epoch's size.

    on_batch(samples_done, values): called after every batch (for progress bars); calling
    ``values()`` gives ``{"loss": ...}``, the running mean reconstruction error so far (a read
    from the device, so the caller does it only when it shows the value).
    """
    check_batch(data, rbm.n_visible, "data")
    check_unit_interval(data, "data")
    check_units(batch_size, "batch_size")
    check_generator(generator)
    lr = _check_float(lr, "lr", 0.0)
    momentum = _check_float(momentum, "momentum", 0.0, 1.0)
    weight_decay = _check_float(weight_decay, "weight_decay", 0.0)
    if velocity is None:
        velocity = {}
    params = dict(rbm.named_parameters())
    W, b_v, b_h = rbm.W, rbm.b_v, rbm.b_h
    n = data.shape[0]
    if shuffle:  # drawn on the generator's device (a CUDA generator cannot fill a CPU tensor)
        order = torch.randperm(n, generator=generator, device=generator.device)
    else:
        order = torch.arange(n)
    if persistent and rbm.persistent_h.shape[0] != batch_size:
        rbm.reset_persistent_chains(batch_size, generator=generator)

    recon_sum = torch.zeros((), dtype=torch.float64, device=W.device)
    fe_sum = torch.zeros((), dtype=torch.float64, device=W.device)
    monitored = 0
    for batch_index, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]
        v = data[idx.to(data.device)].to(device=W.device, dtype=W.dtype)  # (B, V)
        monitor = batch_index % MONITOR_EVERY == 0
        result = cd_gradient(
            v,
            W,
            b_v,
            b_h,
            k=k,
            generator=generator,
            h_chain=rbm.persistent_h if persistent else None,
            with_free_energy=monitor,
            weight_grad=False,  # folded into the velocity below
        )
        if persistent:
            rbm.persistent_v = result.v_negative
            rbm.persistent_h = result.h_negative
        if monitor:
            recon = result.reconstruction
            if recon is None:  # PCD: its chains do not start at the data
                recon = visible_probs(result.h_data_probs, W, b_v)
            recon_sum += (v - recon).square_().sum().double()
            fe_sum += result.data_free_energy.sum().double()
            monitored += v.shape[0]
        sgd_momentum_step_(
            params,
            result.grads,
            velocity,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            products={"W": result.weight_factors},
        )
        if on_batch is not None:
            done = min(start + batch_size, n)
            on_batch(done, lambda r=recon_sum, m=monitored: {"loss": float(r) / m})
    return {
        "reconstruction_error": float(recon_sum) / monitored,
        "free_energy": float(fe_sum) / monitored,
        "samples": float(n),
    }
