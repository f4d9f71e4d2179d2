"""One epoch of RBM training with CD-k or PCD and momentum SGD (no autograd).

The update follows Hinton's practical guide: velocity = momentum * velocity
+ lr * (grad - weight_decay * W) with weight decay on W only, then param += velocity, by the
:class:`~fflab.optim.MomentumSGD` of :func:`rbm_optimizer`. The caller owns the optimizer
(checkpoint its velocities with the model to resume exactly); :func:`momentum_schedule`
gives the guide's 0.5 -> 0.9 switch after 5 epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fflab.optim import MomentumSGD

from ._checks import check_batch, check_generator, check_unit_interval, check_units
from .rbm import RBM, cd_gradient, visible_probs

if TYPE_CHECKING:
    from fflab.distributed import Comm

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


class Shard(NamedTuple):
    """One rank's rows of a global block of ``total`` rows (strided, see fflab.distributed)."""

    total: int
    rows: slice


def shard_bernoulli(p: Tensor, shard: Shard, generator: torch.Generator) -> Tensor:
    """0/1 samples of this rank's rows ``p`` (count, ...) drawn as one process draws all
    ``shard.total`` rows (:func:`~fflab.boltzmann._checks.bernoulli`), keeping these rows."""
    shape = (shard.total, *p.shape[1:])
    u = torch.rand(shape, generator=generator, dtype=p.dtype, device=p.device)
    return u[shard.rows].lt_(p)


@torch.no_grad()
def sharded_cd_gradient(
    v_data: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    *,
    k: int,
    generator: torch.Generator,
    data: Shard,
    chains: Shard,
    h_chain: Tensor | None = None,
    with_free_energy: bool = True,
):
    """:func:`~fflab.boltzmann.rbm.cd_gradient` on one rank's rows of the batch and chains.

    ``v_data`` (count, V) are this rank's ``data`` rows; ``h_chain`` (count, H) its rows of the
    persistent chains (``chains``; for CD-k the chains are the data rows). Every sample is
    drawn for all rows and cut to this rank's (:func:`shard_bernoulli`), and the statistics
    are divided by the global row counts, so summing the grads over the ranks gives the
    one-process gradient. Returns a :class:`~fflab.boltzmann.rbm.CDResult` whose grads
    include ``W`` (V, H).
    """
    from .rbm import CDResult

    n_pos = v_data.shape[0]
    if h_chain is None:  # CD-k from a hidden sample of the data
        x_pos = torch.addmm(b_h, v_data, W)
        h_pos = torch.sigmoid(x_pos)
        h = shard_bernoulli(h_pos, chains, generator)
    else:
        h = h_chain
    reconstruction = None
    for step in range(k):
        v_prob = torch.sigmoid(torch.addmm(b_v, h, W.T))
        v = shard_bernoulli(v_prob, chains, generator)
        if step == 0 and h_chain is None:
            reconstruction = v_prob
        if step < k - 1:
            h = shard_bernoulli(torch.sigmoid(torch.addmm(b_h, v, W)), chains, generator)
    both = torch.cat((v_data, v))  # (n_pos + n_neg, V)
    scale = both.new_empty(both.shape[0], 1)
    scale[:n_pos] = 1.0 / data.total
    scale[n_pos:] = -1.0 / chains.total
    if h_chain is None:
        h_prob = torch.sigmoid(torch.addmm(b_h, v, W))
        coef = torch.cat((h_pos, h_prob)).mul_(scale)
    else:
        x_both = torch.addmm(b_h, both, W)
        x_pos = x_both[:n_pos]
        h_both = torch.sigmoid(x_both)
        h_pos, h_prob = h_both[:n_pos], h_both[n_pos:]
        coef = h_both * scale
    h_next = shard_bernoulli(h_prob, chains, generator) if h_chain is not None else None
    data_fe = -(v_data @ b_v) - F.softplus(x_pos).sum(-1) if with_free_energy else None
    grads = {"W": both.T @ coef, "b_v": torch.mv(both.T, scale.view(-1)), "b_h": coef.sum(0)}
    return CDResult(grads, v, h_next, reconstruction, data_fe, h_pos, (both.T, coef))


def reset_sharded_chains(rbm: RBM, n_chains: int, comm: Comm, generator: torch.Generator) -> None:
    """This rank's rows of ``n_chains`` fresh persistent chains, drawn as
    :meth:`RBM.reset_persistent_chains` draws them all."""
    shard = Shard(n_chains, comm.rows(n_chains))
    p = rbm.b_h.new_full((comm.count(n_chains), rbm.n_hidden), 0.5)
    rbm.persistent_h = shard_bernoulli(p, shard, generator)
    rbm.persistent_v = rbm.b_v.new_zeros(p.shape[0], rbm.n_visible)


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
    comm: Comm | None = None,
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

    comm: a :class:`fflab.distributed.Comm`: this rank computes the statistics of its rows of
    every batch (and its rows of the persistent chains), all-reduces the gradients and steps;
    the samples are drawn as one process draws them (:func:`sharded_cd_gradient`). The
    returned monitors are over every rank's rows; ``values()`` is this rank's own.
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
    buckets = None
    if comm is not None:
        from fflab.distributed import GradBuckets

        buckets = GradBuckets([[W, b_v, b_h]])
        if persistent and rbm.persistent_h.shape[0] != comm.count(batch_size):
            reset_sharded_chains(rbm, batch_size, comm, generator)
    elif persistent and rbm.persistent_h.shape[0] != batch_size:
        rbm.reset_persistent_chains(batch_size, generator=generator)

    recon_sum = torch.zeros((), dtype=torch.float64, device=W.device)
    fe_sum = torch.zeros((), dtype=torch.float64, device=W.device)
    monitored = 0
    for batch_index, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]
        monitor = batch_index % MONITOR_EVERY == 0
        h_chain = rbm.persistent_h if persistent else None
        if comm is not None:
            idx, b = idx[comm.rows(idx.shape[0])], idx.shape[0]
        v = data[idx.to(data.device)].to(device=W.device, dtype=W.dtype)  # (B, V)
        if comm is not None:
            rows = Shard(b, comm.rows(b))  # CD's chains are the batch's rows
            chains = Shard(batch_size, comm.rows(batch_size)) if persistent else rows
            result = sharded_cd_gradient(
                v,
                W,
                b_v,
                b_h,
                k=k,
                generator=generator,
                data=rows,
                chains=chains,
                h_chain=h_chain,
                with_free_energy=monitor,
            )
        else:
            result = cd_gradient(
                v,
                W,
                b_v,
                b_h,
                k=k,
                generator=generator,
                h_chain=h_chain,
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
        if buckets is not None:  # this rank's share into .grad, summed over the ranks
            buckets.bind()
            for name, grad in result.grads.items():
                params[name].grad.copy_(grad)
            buckets.reduce_(comm, 1.0)
        else:
            optimizer.fold_product_(W, *result.weight_factors)  # one GEMM, no dense gradient
            for name, grad in result.grads.items():  # the biases
                optimizer.fold_(params[name], grad)
        optimizer.step()
        if on_batch is not None:
            done = min(start + batch_size, n)
            on_batch(done, lambda r=recon_sum, m=monitored: {"loss": float(r) / m})
    if comm is not None:  # the monitors over every rank's rows
        sums = torch.stack([recon_sum, fe_sum, recon_sum.new_tensor(float(monitored))])
        recon_sum, fe_sum, monitored = comm.all_reduce_(sums).unbind()
    return {
        "reconstruction_error": float(recon_sum) / float(monitored),
        "free_energy": float(fe_sum) / float(monitored),
        "samples": float(n),
    }
