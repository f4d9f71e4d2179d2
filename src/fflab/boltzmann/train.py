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

# PCD's reconstruction error needs a down-pass the update does not: pay it 1 batch in 10.
_PCD_MONITOR_EVERY = 10


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
) -> None:
    """In-place ascent step: v = m v + lr (g - wd p) (wd only on ``decayed``); p += v."""
    for name, p in params.items():
        vel = velocity.get(name)
        if vel is None:
            vel = velocity[name] = torch.zeros_like(p)
        vel.mul_(momentum).add_(grads[name], alpha=lr)
        if weight_decay and name in decayed:
            vel.add_(p, alpha=-lr * weight_decay)
        p.add_(vel)


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
    on_batch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``rbm`` in place for one pass over ``data`` (N, V) in minibatches.

    persistent=False: CD-k; True: PCD-k with ``batch_size`` chains in the RBM's buffers.
    velocity: momentum buffers keyed by parameter name, updated in place; None starts
    from zero (so pass the same dict every epoch to carry momentum across epochs).
    A last partial batch is used as is. ``data`` is cast to the RBM's dtype per batch
    and is never modified.

    Returns means over the epoch's samples: ``reconstruction_error`` (squared error
    per sample between v and p(v | h), h ~ p(h | v); for PCD, whose chains do not start
    at the data, h = p(h | v) and the extra down-pass is paid on every 10th batch only,
    so the value is an estimate from those batches), ``free_energy`` (mean F(v) before
    each update), ``samples``.

    on_batch(samples_done, values): called after every batch (for progress bars); every
    10th batch ``values`` holds ``loss``, the running mean reconstruction error.
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
    recon_count = 0
    for batch_index, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]
        v = data[idx.to(data.device)].to(device=W.device, dtype=W.dtype)  # (B, V)
        result = cd_gradient(
            v,
            W,
            b_v,
            b_h,
            k=k,
            generator=generator,
            h_chain=rbm.persistent_h if persistent else None,
        )
        if persistent:
            rbm.persistent_v = result.v_negative
            rbm.persistent_h = result.h_negative
            if batch_index % _PCD_MONITOR_EVERY == 0:
                recon = visible_probs(result.h_data_probs, W, b_v)
                recon_sum += (v - recon).square_().sum().double()
                recon_count += v.shape[0]
        else:
            recon_sum += (v - result.reconstruction).square_().sum().double()
            recon_count += v.shape[0]
        fe_sum += result.data_free_energy.sum().double()
        sgd_momentum_step_(
            params, result.grads, velocity, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        if on_batch is not None:
            done = min(start + batch_size, n)
            if batch_index % _PCD_MONITOR_EVERY == 0:
                on_batch(done, {"loss": float(recon_sum) / max(recon_count, 1)})
            else:
                on_batch(done, {})
    return {
        "reconstruction_error": float(recon_sum) / recon_count,
        "free_energy": float(fe_sum) / n,
        "samples": float(n),
    }
