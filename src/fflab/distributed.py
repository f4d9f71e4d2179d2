"""Data-parallel training on ``torch.distributed``: the process group, shards, reductions.

Under ``torchrun`` every process (rank) holds the whole dataset and a replica of the model.
An epoch's permutation comes from the run's seed, so every rank cuts the same global batches
(``batch_size`` rows each); rank ``r`` of ``N`` keeps rows ``r, r + N, r + 2N, ...`` of each
(strided shards: their sizes differ by at most one). A rank's gradients are means over its
rows; they are weighted by ``rows / batch rows`` and summed across the ranks before every
update, so every replica makes the update one process makes on the global batch. Every random
number of a step is drawn for the whole global batch from the shared generator and each rank
keeps its rows, so the generator streams stay in lock-step and N processes make exactly the
draws of one. Peer normalization's batch means are reduced the same way.

The backend is gloo on CPU and NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``).
A collective that fails (a peer died, or did not answer within the process-group timeout)
raises :class:`PeerLost`.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from fflab.ff.functional import dropout_mask
from fflab.ff.train import FFTrainer
from fflab.negatives import NegativeBatch, NegativeSource

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits in a collective before the run stops
# gradients are all-reduced in flat buffers of about this size: small enough that a layer's
# buffer can travel while the layers above compute theirs (FF), large enough to amortize a
# collective's latency
BUCKET_BYTES = 4 << 20
PARALLEL_ALGORITHMS = ("ff", "bp", "rbm")
SCHEMES = ("data", "pipeline")  # shards of every batch | blocks of layers (fflab.pipeline)


class DistributedError(RuntimeError):
    """The processes of a data-parallel run cannot go on together; the message says why."""


class PeerLost(DistributedError):
    """A collective failed: another process died or did not answer within the timeout."""


def _reason(e: BaseException) -> str:
    """The first sentence of a backend's error, without its source location."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../pair.cc:537] Read error ..."
    return text.split(". ")[0][:160]


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting the
    ``RANK``/``WORLD_SIZE`` environment) or already belongs to a process group."""
    return dist.is_available() and (
        dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    )


@dataclass
class Comm:
    """This process's place in the process group, and the collectives the run loop uses."""

    rank: int
    world_size: int
    device: torch.device
    timeout: float
    owns_group: bool = False  # created by :func:`init` (and destroyed by :meth:`close`)

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes the run directory."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` rows."""
        return slice(self.rank, n, self.world_size)

    def count(self, n: int) -> int:
        """How many rows of a global batch of ``n`` rows this rank holds."""
        return len(range(self.rank, n, self.world_size))

    def _run(self, fn: Callable, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as e:  # gloo/NCCL errors are RuntimeErrors
            raise PeerLost(
                f"rank {self.rank} of {self.world_size}: lost contact with the other "
                f"processes ({_reason(e)})"
            ) from None

    def all_reduce_(self, t: Tensor, op=None) -> Tensor:
        """Sum (or ``op``) ``t`` over the ranks, in place."""
        self._run(dist.all_reduce, t, op=op or dist.ReduceOp.SUM)
        return t

    def all_reduce_async(self, t: Tensor) -> Any:
        """Start summing ``t`` over the ranks in place; returns the work to ``wait_``."""
        return self._run(dist.all_reduce, t, op=dist.ReduceOp.SUM, async_op=True)

    def wait_(self, work: Any) -> None:
        """Wait for a collective started by :meth:`all_reduce_async`."""
        self._run(work.wait)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_(t, dist.ReduceOp.MAX).item() > 0)

    def gather_rows(self, local: Tensor, n: int) -> Tensor:
        """The global batch (n, ...) from every rank's strided rows ``local`` (count(n), ...)."""
        m = math.ceil(n / self.world_size)
        pad = local.new_zeros((m, *local.shape[1:]))
        pad[: local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        self._run(dist.all_gather, parts, pad)
        # row j of rank r is global row j * N + r
        return torch.stack(parts, 1).reshape(m * self.world_size, *local.shape[1:])[:n]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled)."""
        box = [obj if self.rank == src else None]
        device = self.device if self.device.type == "cuda" else None
        self._run(dist.broadcast_object_list, box, src=src, device=device)
        return box[0]

    def from_lead(self, fn: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
        """``fn()`` run on rank 0 and its result sent to every rank; one of ``errors`` that it
        raises is raised on every rank."""
        outcome: tuple[bool, Any] = (True, None)
        if self.lead:
            try:
                outcome = (True, fn())
            except errors as e:
                outcome = (False, e)
        ok, value = self.broadcast(outcome)
        if not ok:
            raise value
        return value

    def together(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every rank; if it fails on any, every rank stops (the failing ones with
        their own error, the others with a :class:`DistributedError` saying so)."""
        try:
            value = fn()
        except Exception:
            self.any(True)
            raise
        if self.any(False):
            raise DistributedError(
                f"rank {self.rank}: another process failed to set up the run (see its message)"
            )
        return value

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """Exit with ``code``; a process of a launch (:func:`launched`) skips the interpreter's
    teardown.

    Once a run is over its files are written and closed (atomically) and its process group
    destroyed, but torch 2.13's native objects can still abort the process as it finalizes:
    a rank that had passed gloo point-to-point messages was seen to end with "terminate
    called without an active exception" after its last Python line (its stack: no Python
    frame), so torchrun reported the run failed and stopped the other ranks. ``os._exit``
    after flushing stdout and stderr ends the process without that teardown.
    """
    if not launched():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Comm | None:
    """Join the process group of a ``torchrun`` launch (None when not launched).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the
    environment. On CUDA each process takes ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo.
    ``timeout``: seconds any collective (and the rendezvous) may wait for the other ranks.
    """
    if not launched():
        return None
    if timeout <= 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return Comm(dist.get_rank(), dist.get_world_size(), device, timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the process group ({_reason(e)})") from None
    return Comm(dist.get_rank(), dist.get_world_size(), device, timeout, owns_group=True)


# -- gradients in flat buffers -------------------------------------------------------------------
class GradBuckets:
    """Parameters' gradients as views of a few flat buffers, all-reduced one buffer at a time.

    ``units`` lists parameter groups that learn or rest together (a layer's weight and bias);
    consecutive units share a buffer up to ``bucket_bytes``. :meth:`bind` points every
    parameter's ``.grad`` at its view, so whatever writes the gradients writes the buffers and
    no copy is made. ``extra`` values (loss statistics) ride at the end of the last buffer.
    A step that reports each unit as it completes (:meth:`unit_done`) has a full buffer's
    all-reduce start at once, overlapping the gradients still to be computed.
    """

    def __init__(
        self, units: Sequence[Sequence[Tensor]], extra: int = 0, bucket_bytes: int = BUCKET_BYTES
    ) -> None:
        self.units = [list(u) for u in units]
        self.extra = extra
        plan: list[list[int]] = [[]]
        size = 0
        for i, unit in enumerate(self.units):
            nbytes = sum(p.numel() * p.element_size() for p in unit)
            if plan[-1] and size + nbytes > bucket_bytes:
                plan.append([])
                size = 0
            plan[-1].append(i)
            size += nbytes
        self.buckets: list[tuple[list[int], Tensor]] = []
        self.views: list[tuple[Tensor, Tensor]] = []
        self.unit_views: list[list[Tensor]] = [[] for _ in self.units]
        for b, unit_ids in enumerate(plan):
            params = [p for i in unit_ids for p in self.units[i]]
            tail = extra if b == len(plan) - 1 else 0
            like = params[0]
            flat = torch.zeros(
                sum(p.numel() for p in params) + tail, dtype=like.dtype, device=like.device
            )
            offset = 0
            for i in unit_ids:
                for p in self.units[i]:
                    view = flat[offset : offset + p.numel()].view_as(p)
                    self.views.append((p, view))
                    self.unit_views[i].append(view)
                    offset += p.numel()
            self.buckets.append((unit_ids, flat))
        self.bucket_of = {i: b for b, (ids, _) in enumerate(self.buckets) for i in ids}
        self._done: set[int] = set()  # units whose gradients are complete this step
        self._launched: dict[int, Any] = {}  # bucket -> its all-reduce in flight

    def bind(self) -> None:
        """Point every parameter's ``.grad`` at its view of the buffers."""
        for p, view in self.views:
            if p.grad is not view:
                p.grad = view

    def unbind(self, keep: set[int]) -> None:
        """Clear ``.grad`` of the units not in ``keep`` (the optimizer then leaves them be)."""
        for i, unit in enumerate(self.units):
            if i not in keep:
                for p in unit:
                    p.grad = None

    def zero_(self) -> None:
        for _, flat in self.buckets:
            flat.zero_()

    def unit_done(self, unit: int, comm: Comm, weight: float) -> None:
        """Unit ``unit``'s gradients are complete: once every unit of its buffer is, and the
        buffer does not carry the extras, start that buffer's all-reduce (``weight`` times
        the gradient) in the background while the step computes the rest.
        :meth:`reduce_` waits for it."""
        self._done.add(unit)
        b = self.bucket_of[unit]
        unit_ids, flat = self.buckets[b]
        if b == len(self.buckets) - 1 or b in self._launched:
            return  # the last buffer carries the extras: it goes in reduce_
        if all(i in self._done for i in unit_ids):
            if weight != 1.0:
                flat.mul_(weight)
            self._launched[b] = comm.all_reduce_async(flat)

    def adopt(self) -> None:
        """Copy a gradient that autograd put elsewhere into its view, and bind it."""
        for p, view in self.views:
            if p.grad is not None and p.grad is not view:
                view.copy_(p.grad)
            p.grad = view

    def reduce_(
        self,
        comm: Comm,
        weight: float,
        active: set[int] | None = None,
        extra: Tensor | None = None,
    ) -> Tensor | None:
        """Sum ``weight * gradient`` over the ranks for the ``active`` units (default: all);
        returns the summed ``weight * extra`` (or None). A buffer without an active unit is
        left out; inactive units sharing one with active units are zeroed first."""
        out = None
        launched, self._launched, self._done = self._launched, {}, set()
        for b, (unit_ids, flat) in enumerate(self.buckets):
            if b in launched:  # started by unit_done
                comm.wait_(launched[b])
                continue
            last = b == len(self.buckets) - 1
            live = [i for i in unit_ids if active is None or i in active]
            if not live and not (last and extra is not None):
                continue
            for i in unit_ids:
                if i not in live:
                    for view in self.unit_views[i]:
                        view.zero_()
            if last and extra is not None:
                flat[flat.numel() - self.extra :].copy_(extra.reshape(-1))
            if weight != 1.0:
                flat.mul_(weight)
            comm.all_reduce_(flat)
            if last and extra is not None:
                out = flat[flat.numel() - self.extra :].view_as(extra).clone()
        return out


# -- Forward-Forward -------------------------------------------------------------------------------
class ShardedSource(NegativeSource):
    """A negative source drawing for the whole global batch, each rank keeping its rows.

    :meth:`batch` gives it the step's global batch. ``draw`` then hands the inner source the
    global images and labels (and, when it needs them, the softmax probabilities of every
    rank's rows, gathered), so its random draws are exactly those of one process.
    """

    def __init__(self, inner: NegativeSource, comm: Comm) -> None:
        self.inner, self.comm = inner, comm
        self.name, self.labelled, self.needs_probs = inner.name, inner.labelled, inner.needs_probs
        self._batch: tuple[Tensor, Tensor, slice] | None = None

    def batch(self, x: Tensor, y: Tensor, rows: slice) -> None:
        """The step's global images (B, D), labels (B,) and this rank's rows of them."""
        self._batch = (x, y, rows)

    def draw(self, x, y, generator, probs=None) -> NegativeBatch:
        if self._batch is None:
            raise RuntimeError("ShardedSource.batch must be called before draw")
        xg, yg, rows = self._batch
        if self.needs_probs and probs is not None:
            probs = self.comm.gather_rows(probs, xg.shape[0])
        neg = self.inner.draw(xg, yg, generator, probs)
        nx = x if neg.x is xg else neg.x[rows]
        return NegativeBatch(nx, None if neg.y is None else neg.y[rows])


class DataParallelFFTrainer(FFTrainer):
    """:class:`FFTrainer` on one rank's shard of every global batch.

    :meth:`step` takes the global batch, applies input dropout to all of it (one mask per
    image, as one process draws it), computes the local gradients of its rows unfused (into
    ``.grad``, views of :class:`GradBuckets`), all-reduces them with the loss statistics and
    steps. Dropout masks of the hidden layers are drawn for the whole batch and cut to the
    rank's rows; peer normalization's batch means are averaged over the ranks.
    """

    def __init__(self, net, cfg, comm: Comm) -> None:
        self.input_dropout = cfg.input_dropout  # applied by step() to the global batch
        super().__init__(net, replace(cfg, input_dropout=0.0))
        self.comm = comm
        self.fused = False
        self.source = ShardedSource(self.source, comm)
        units = [list(layer.parameters()) for layer in self._layers]
        units.append(list(net.head.parameters()))
        self.buckets = GradBuckets(units, extra=3 * net.num_layers)
        self._shard: tuple[int, slice] = (0, slice(None))
        self._weight = 1.0  # this rank's share of the step's batch

    def _layer_gradient(self, i, a, h, coef, first=None):
        super()._layer_gradient(i, a, h, coef, first)
        self.buckets.unit_done(i, self.comm, self._weight)  # layer i's buffer may travel now

    @torch.no_grad()
    def step(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        """One update on the global batch x (B, D), y (B,); returns the global stats (L, 3)."""
        b = x.shape[0]
        if self.input_dropout > 0:
            x = x * dropout_mask(x.shape, self.input_dropout, generator, x)
        rows = self.comm.rows(b)
        self._shard = (b, rows)
        self._weight = self.comm.count(b) / b
        self.source.batch(x, y, rows)
        self.buckets.bind()
        stats = self.compute_gradients(x[rows].contiguous(), y[rows], generator, active)
        live = set(range(self.net.num_layers)) - set(self._inactive)
        if self.net.config.supervised:  # the head learns in the neutral pass
            live.add(self.net.num_layers)
        stats = self.buckets.reduce_(self.comm, self._weight, live, stats)
        self.buckets.unbind(live)  # what did not learn gets no step
        self.apply_gradients()
        return stats

    def _batch_mean(self, a: Tensor) -> Tensor:
        b = self._shard[0]
        return self.comm.all_reduce_(a.mean(0).mul_(a.shape[0] / b))

    def _dropout_mask(self, shape, p: float, generator: torch.Generator, like: Tensor) -> Tensor:
        b, rows = self._shard
        if shape[0] != 2 * self.comm.count(b):
            raise RuntimeError("a data-parallel dropout mask covers stacked pos/neg rows")
        full = dropout_mask((2 * b, *shape[1:]), p, generator, like)  # (2B, H)
        keep = torch.arange(b, device=full.device)[rows]
        return full[torch.cat([keep, keep + b])]


# -- setup ---------------------------------------------------------------------------------------
def check_batches(n: int, batch_size: int, comm: Comm) -> None:
    """Every global batch (the last one too) must give every rank at least one row."""
    last = n % batch_size or batch_size
    if min(batch_size, last, n) < comm.world_size:
        raise ValueError(
            f"{comm.world_size} processes need at least {comm.world_size} rows in every batch; "
            f"batch_size {batch_size} on {n} samples leaves a batch of {min(last, n)}"
        )


def parallelize(
    algorithm: str,
    exp: Any,
    comm: Comm,
    scheme: str = "data",
    stages: Sequence[int] | None = None,
) -> Any:
    """Make the experiment ``exp`` of ``algorithm`` train on this rank's shards (``scheme``
    data) or on this rank's block of layers (``scheme`` pipeline: :mod:`fflab.pipeline`;
    ``stages``: layers per rank, default a split balanced by cost)."""
    if scheme not in SCHEMES:
        raise ValueError(f"--parallel must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "pipeline":
        from fflab.pipeline import PipelineFFTrainer

        if algorithm != "ff" or type(exp.trainer) is not FFTrainer:
            raise ValueError(f"the layer pipeline trains feed-forward FF nets, not {algorithm}")
        exp.trainer = PipelineFFTrainer(exp.net, exp.config.train, comm, stages)
        exp.parallel_report = exp.trainer.epoch_report
        return exp
    if stages is not None:
        raise ValueError("--stages belongs to --parallel pipeline")
    if algorithm not in PARALLEL_ALGORITHMS:
        raise ValueError(
            f"data-parallel training supports the algorithms {', '.join(PARALLEL_ALGORITHMS)}; "
            f"{algorithm} runs in one process"
        )
    check_batches(exp.samples_per_epoch, exp.config.train.batch_size, comm)
    if algorithm == "ff":
        if type(exp.trainer) is not FFTrainer:
            raise ValueError(f"data-parallel FF needs FFTrainer, not {type(exp.trainer).__name__}")
        exp.trainer = DataParallelFFTrainer(exp.net, exp.config.train, comm)
    else:  # bp, rbm: their experiments shard their own steps
        exp.comm = comm
    return exp
