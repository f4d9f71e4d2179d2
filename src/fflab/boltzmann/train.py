"""One epoch of RBM training with CD-k or PCD and momentum SGD (no autograd).

The update follows Hinton's practical guide: velocity = momentum * velocity
+ lr * (grad - weight_decay * W) with weight decay on W only, then param += velocity, by the
:class:`~fflab.optim.MomentumSGD` of :func:`rbm_optimizer`. The caller owns the optimizer
(checkpoint its velocities with the model to resume exactly); :func:`momentum_schedule`
gives the guide's 0.5 -> 0.9 switch after 5 epochs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fflab.optim import MomentumSGD

from ._checks import check_batch, check_generator, check_unit_interval, check_units
from .rbm import RBM, cd_gradient, visible_probs

__all__ = ["rbm_train_epoch", "rbm_optimizer", "momentum_schedule"]

# The monitored values (reconstruction error, free energy of the data) cost passes the update
# does not need (PCD's reconstruction a whole down-pass): they are taken on 1 batch in 10.
MONITOR_EVERY = 10


def momentum_schedule(
    epoch: int, *, initial: float = 0.5, final: float = 0.9, switch_epoch: int = 5
) -> float:
    """Momentum for a 0-based epoch: ``initial`` before ``switch_epoch``, then ``final``."""
    return initial if epoch < switch_epoch else final


def rbm_optimizer(
    rbm: RBM, *, lr: float = 0.05, momentum: float = 0.5, weight_decay: float = 2e-4
) -> MomentumSGD:
    """The practical guide's momentum ascent for ``rbm``: ``v = m v + lr (g - wd W)`` with
    weight decay on W only, ``p += v``.

    Group 0 holds W (weight decay ``weight_decay``), group 1 the biases (none); set ``lr`` and
    ``momentum`` of both per epoch, as with any torch optimizer.
    """
    groups = [
        {"params": [rbm.W], "weight_decay": weight_decay},
        {"params": [rbm.b_v, rbm.b_h], "weight_decay": 0.0},
    ]
    return MomentumSGD(groups, lr=lr, momentum=momentum, lr_in_velocity=True, maximize=True)


@torch.no_grad()
def rbm_train_epoch(
    rbm: RBM,
    data: Tensor,
    *,
    batch_size: int = 100,
    optimizer: MomentumSGD | None = None,
    k: int = 1,
    persistent: bool = False,
    generator: torch.Generator,
    shuffle: bool = True,
    on_batch: Callable[[int, Callable[[], dict[str, float]]], None] | None = None,
) -> dict[str, float]:
    """Train ``rbm`` in place for one pass over ``data`` (N, V) in minibatches.

    persistent=False: CD-k; True: PCD-k with ``batch_size`` chains in the RBM's buffers.
    optimizer: a :class:`~fflab.optim.MomentumSGD` over the RBM's parameters, as
    :func:`rbm_optimizer` builds it (its lr and momentum are this epoch's; pass the same one
    every epoch to carry the velocities across epochs); None: a fresh :func:`rbm_optimizer`
    with the guide's settings (lr 0.05, momentum 0.5, weight decay 2e-4).
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
    if optimizer is None:
        optimizer = rbm_optimizer(rbm)
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
        optimizer.fold_product_(W, *result.weight_factors)  # one GEMM, no dense gradient
        for name, grad in result.grads.items():  # the biases
            optimizer.fold_(params[name], grad)
        optimizer.step()
        if on_batch is not None:
            done = min(start + batch_size, n)
            on_batch(done, lambda r=recon_sum, m=monitored: {"loss": float(r) / m})
    return {
        "reconstruction_error": float(recon_sum) / monitored,
        "free_energy": float(fe_sum) / monitored,
        "samples": float(n),
    }
