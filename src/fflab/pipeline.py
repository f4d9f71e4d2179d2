"""FF's layer pipeline on ``torch.distributed``: each process trains a block of layers.

No gradient crosses an FF layer, so layer ``l`` needs from the layers below only their
RMS-normalized activities, forward. Under ``torchrun --nproc-per-node P`` with
``--parallel pipeline`` the hidden layers are cut into P contiguous blocks (stages); rank
``k`` owns stage ``k``. For every batch, stage 0 runs its layers' positive, negative (and, for
a supervised net, neutral) passes, computes their local gradients, sends the normalized
activities of its last layer to stage 1 and steps its optimizer while stage 1 works on that
batch; stage 1 passes on to stage 2, and so on. The last stage owns the softmax head. So
while stage ``k`` trains on batch ``t``, stage ``k - 1`` trains on batch ``t + 1``: consecutive
batches fill the pipe, and it drains once per epoch.

Every stage sees exactly what one process computes: stage ``k`` receives batch ``t``'s
activities computed with stage ``k - 1``'s weights after ``t - 1`` updates, as one process's
layer ``l`` reads layer ``l - 1`` before the update of step ``t``. Random draws stay in
lock-step: every rank holds the whole dataset and the epoch's generator, and every stage
makes (and throws away) the draws of the other stages that come before its own in one
process's step (dropout masks, negatives), so P processes end with the weights of one. The
one recipe this cannot reproduce is a negative source that reads the softmax head (``hard``):
the head sits after the last layer, and stage 0 would have to wait for the whole pipe before
every batch. It is refused; ``random`` wrong labels and hybrid images pipeline.

At the end of every epoch the stages exchange their layers, optimizer state and peer
normalization means, so every rank holds the whole net: evaluation, checkpoints and resume are
those of data-parallel runs.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fflab.ff.functional import dropout_mask, goodness_loss_terms
from fflab.ff.model import FFNet
from fflab.ff.train import FFTrainConfig, FFTrainer
from fflab.optim import lr_factor

SEND_DEPTH = 2  # batches a stage may have in flight to the next before it waits


# -- where to cut ---------------------------------------------------------------------------
def layer_costs(net: FFNet) -> list[float]:
    """Multiply-adds per training image of every layer's part of an FF step (L,).

    A layer's forward product costs its number of weights per row (dense: in x out; locally
    connected: the connections that exist), and so does its weight gradient. Per image, a
    layer above the first runs 2 forward rows (positive, negative) and 2 gradient rows, plus
    one neutral forward row in a supervised net. A supervised first layer shares one image
    product by all its rows and one gradient product by the positive and negative row.
    """
    supervised = net.config.supervised
    costs = []
    for i, layer in enumerate(net.layers):
        w = float(layer.weight.numel())
        if i == 0 and supervised:
            costs.append(2 * w)
        else:
            costs.append((5 if supervised else 4) * w)
    return costs


def partition(costs: Sequence[float], stages: int) -> list[int]:
    """Layers per stage (``stages`` contiguous, non-empty blocks) that minimize the largest
    stage's cost; among equal maxima, the split with the most layers in later stages first.

    >>> partition([2.0, 5.0, 5.0], 2)
    [2, 1]
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} pipeline stages need between 1 and {n} layers each")
    best: tuple[float, list[int]] | None = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
        if best is None or worst < best[0] - 1e-9 * worst:
            best = (worst, sizes)
    assert best is not None
    return best[1]


def check_stages(sizes: Sequence[int], n_layers: int, world_size: int) -> list[int]:
    """``sizes`` (layers per stage) as a list, or a ValueError saying what is wrong."""
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size:
        raise ValueError(
            f"--stages lists {len(sizes)} stages for {world_size} processes; give one number "
            "of layers per process"
        )
    if min(sizes) < 1 or sum(sizes) != n_layers:
        raise ValueError(
            f"--stages {','.join(map(str, sizes))} must give every process at least one layer "
            f"and add up to the net's {n_layers} hidden layers"
        )
    return sizes


def fill_drain_bubble(stages: int, batches: int) -> float:
    """The idle fraction of a perfectly balanced pipe that fills and drains once per epoch:
    each stage idles ``stages - 1`` of ``batches + stages - 1`` batch slots."""
    return (stages - 1) / (batches + stages - 1)


# -- the point-to-point link between neighbouring stages ----------------------------------------
class _Link:
    """One epoch's messages from the stage before (received ahead, into alternate buffers) and
    to the stage after (at most ``depth`` in flight); times every wait."""

    def __init__(self, comm, sizes: list[int], like: Tensor, prev: int | None, nxt: int | None):
        self.comm, self.sizes, self.prev, self.next = comm, sizes, prev, nxt
        self.like = like
        self.waited = 0.0
        self.sent_bytes = 0
        self._pending: deque = deque()
        self._posted: tuple[int, Any, Tensor] | None = None
        if prev is not None and sizes:
            self._post(0)

    def _post(self, t: int) -> None:
        buf = self.like.new_empty(self.sizes[t])
        work = self.comm._run(dist.irecv, buf, src=self.prev)
        self._posted = (t, work, buf)

    def _wait(self, work) -> None:
        t0 = time.perf_counter()
        self.comm._run(work.wait)
        self.waited += time.perf_counter() - t0

    def recv(self, t: int) -> Tensor:
        """Batch t's message; posts the receive of batch t + 1."""
        posted, work, buf = self._posted
        assert posted == t, (posted, t)
        self._wait(work)
        if t + 1 < len(self.sizes):
            self._post(t + 1)
        return buf

    def send(self, flat: Tensor, depth: int = SEND_DEPTH) -> None:
        work = self.comm._run(dist.isend, flat, dst=self.next)
        self._pending.append((work, flat))
        self.sent_bytes += flat.numel() * flat.element_size()
        while len(self._pending) > depth:
            self._wait(self._pending.popleft()[0])

    def close(self) -> None:
        while self._pending:
            self._wait(self._pending.popleft()[0])


# -- a stage ---------------------------------------------------------------------------------
class PipelineFFTrainer(FFTrainer):
    """:class:`FFTrainer` for one stage of the layer pipeline: layers ``first..stop - 1``.

    It runs the shared step's pieces on its own layers: stage 0 the supervised or
    unsupervised first phase of :class:`FFTrainer` (label embedding, negatives, the fused
    first-layer gradient), a later stage the same pass and local gradients from the received
    activities; the last stage the softmax head. ``stages``: layers per stage (default: the
    split of :func:`partition` by :func:`layer_costs`).
    """

    def __init__(
        self, net: FFNet, cfg: FFTrainConfig, comm, stages: Sequence[int] | None = None
    ) -> None:
        if cfg.step_schedule != "forward_first":
            raise ValueError(
                "the layer pipeline runs step_schedule=forward_first (a stage holds only its "
                "own layers' activities)"
            )
        net.require_no_boxes(type(self).__name__)  # a stage hands on normalized activities
        super().__init__(net, cfg)
        if self.source.needs_probs:
            raise ValueError(
                f"the layer pipeline cannot use negatives={cfg.negatives}: it reads the softmax "
                "head, after the last stage; use negatives=random (or run data-parallel)"
            )
        n = net.num_layers
        sizes = partition(layer_costs(net), comm.world_size) if stages is None else stages
        self.stages = check_stages(sizes, n, comm.world_size)
        bounds = [0, *itertools.accumulate(self.stages)]
        self.bounds = bounds
        self.comm = comm
        self.first, self.stop = bounds[comm.rank], bounds[comm.rank + 1]
        self.is_first, self.is_last = comm.rank == 0, comm.rank == comm.world_size - 1
        self.local = self._span = range(self.first, self.stop)
        self._incoming: Tensor | None = None
        self._outgoing: list[Tensor] = []
        self._report: dict[str, Any] = {}

    # -- what travels between stages ------------------------------------------------------
    def _neutral_layers(self, stop: int) -> list[int]:
        """Layers whose normalized neutral activities leave a stage ending at ``stop``: the
        head's (``head_from..``) below ``stop``, and always layer ``stop - 1`` (the next
        stage's neutral input)."""
        head_from = self.net.config.head_from
        return sorted(set(range(head_from, stop)) | {stop - 1})

    def _message_size(self, stop: int, b: int) -> int:
        """Numbers in the message a stage ending at ``stop`` sends for a batch of b rows."""
        hidden = self.net.config.hidden
        size = 2 * b * hidden[stop - 1]
        if self.net.config.supervised:
            size += b * sum(hidden[j] for j in self._neutral_layers(stop))
        return size

    def _unpack(self, flat: Tensor, b: int) -> tuple[Tensor, dict[int, Tensor]]:
        """The received message: positive/negative input (2B, H) and neutral blocks by layer."""
        hidden, s = self.net.config.hidden, self.first
        h = hidden[s - 1]
        pn, offset, neutral = flat[: 2 * b * h].view(2 * b, h), 2 * b * h, {}
        if self.net.config.supervised:
            for j in self._neutral_layers(s):
                neutral[j] = flat[offset : offset + b * hidden[j]].view(b, hidden[j])
                offset += b * hidden[j]
        return pn, neutral

    # -- the step's pieces, on this stage's layers ------------------------------------------
    def _pass(self, z0, normalize_last=False, generator=None):
        """:meth:`FFTrainer._pass` over this stage's layers (``_span``; z0: layer
        ``first``'s total input); the last layer's normalized activities are appended unless
        this is the last stage (they are sent on).

        ``acts`` and ``inputs`` hold this stage's layers only; ``ssq`` has an entry for every
        layer of the net (zeros outside the stage), so that the loss terms are computed on
        the (L, 2B) stack one process computes: elementwise kernels round the same element
        the same way only at the same position of the same shape.
        """
        acts, ssq, inputs = super()._pass(z0, normalize_last or not self.is_last, generator)
        zero = torch.zeros_like(ssq[0])
        ssq = [zero] * self.first + ssq + [zero] * (self.net.num_layers - self.stop)
        return acts, ssq, inputs

    def _local_gradients(self, acts, inputs, coef, active, first=None) -> None:
        """The local layers' gradients (``acts`` and ``inputs`` indexed from layer ``first``,
        ``coef`` (L, 2B) by layer); keeps the last layer's normalized activities to send."""
        b = acts[0].shape[0] // 2
        self._count_active([a[:b] for a in acts])
        if len(inputs) > len(acts):
            self._outgoing = [inputs[len(acts)]]
        s = self.first
        for i in active:
            if s <= i < self.stop:
                self._layer_gradient(i, acts[i - s], inputs[i - s], coef[i], first)

    def _count_active(self, positive: list[Tensor]) -> None:
        if self._active_counts is None:
            self._active_counts = [
                torch.zeros(h, device=positive[0].device) for h in self.net.config.hidden
            ]
        for i, a in zip(self.local, positive, strict=True):
            self._active_counts[i] += (a > 0).sum(0)
        self._active_rows += positive[0].shape[0]

    def _neutral_phase(self, x, a_img, sq, y, eye, generator) -> Tensor:
        """Stage 0's neutral pass (kept to send on) and the negative labels; the head is the
        last stage's."""
        net = self.net
        z0 = net.first_layer(a_img, net.label_scale(sq, True), None)
        _, _, inputs = self._pass(z0, normalize_last=True)
        self._neutral = {j: inputs[j + 1] for j in range(self.stop)}  # normalized, by layer
        if self.is_last:
            feats = torch.cat([self._neutral[j] for j in range(net.config.head_from, self.stop)], 1)
            return self._head_phase(x, y, feats, eye, generator)
        neg = self.source.draw(x, y, generator)
        return neg.y

    def _replay(self, x: Tensor, y: Tensor, generator: torch.Generator, layers: range) -> None:
        """Make (and drop) the dropout masks of ``layers`` that one process draws in a step
        (their inputs' shapes: (2B, H_{l-1}))."""
        p, hidden, b = self.cfg.dropout, self.net.config.hidden, x.shape[0]
        if p > 0:
            for j in layers:
                dropout_mask((2 * b, hidden[j - 1]), p, generator, x)

    def _downstream(self, x, y, generator, active) -> Tensor:
        """A later stage's step from the received activities; returns the stats (L, 3) (rows
        outside the stage are meaningless)."""
        c, b, p = self.net.config, y.shape[0], self.cfg.dropout
        pn, neutral = self._unpack(self._incoming, b)
        s = self.first
        if p > 0:  # the draws one process makes before this stage's: input mask, negatives
            self.source.draw(x, y, generator)
            self._replay(x, y, generator, range(1, s))
            pn = pn * self._dropout_mask(pn.shape, p, generator, pn)
        widths, theta, target, eye = self._constants(b, pn)
        if c.supervised:  # the neutral pass through this stage's layers
            _, _, ninputs = self._pass(self._layers[s](neutral[s - 1]), normalize_last=True)
            for j in self.local:
                neutral[j] = ninputs[j - s + 1]
            self._neutral = neutral
            if self.is_last:
                feats = torch.cat([neutral[j] for j in range(c.head_from, self.net.num_layers)], 1)
                self._head_gradient(y, feats, eye, torch.softmax(self.net.head(feats), 1))
        acts, ssq, inputs = self._pass(self._layers[s](pn), generator=generator)
        inputs[0] = pn
        stats, coef = goodness_loss_terms(torch.stack(ssq), theta, widths, target, c.goodness)
        self._local_gradients(acts, inputs, coef, active)
        return stats

    @torch.no_grad()
    def compute_gradients(self, x, y, generator, active=None) -> Tensor:
        """This stage's part of the step on the batch x (B, D), y (B,): stats (L, 3), of which
        rows ``first..stop - 1`` are this stage's (the others are meaningless).

        A later stage reads the message of the stage before from ``_incoming``; every stage
        leaves what it sends in ``_outgoing``.
        """
        n = self.net.num_layers
        active = range(n) if active is None else active
        self._inactive = [i for i in self.local if i not in active]
        own_draws = self.is_first or self.cfg.dropout > 0
        if self.cfg.input_dropout > 0 and own_draws:
            x = x * dropout_mask(x.shape, self.cfg.input_dropout, generator, x)
        if not self.is_first:
            stats = self._downstream(x, y, generator, active)
        elif self.net.config.supervised:
            stats = self._supervised(x, y, generator, active)
        else:
            stats = self._unsupervised(x, y, generator, active)
        self._replay(x, y, generator, range(max(self.stop, 1), n))
        if self.net.config.supervised and not self.is_last:
            self._outgoing += [self._neutral[j] for j in self._neutral_layers(self.stop)]
        return stats

    # -- an epoch ---------------------------------------------------------------------------
    def train_epoch(
        self, x, y, epoch, generator, active=None, lr_epochs=None, on_batch=None
    ) -> Tensor:
        """One pass over (x, y) through the pipe (every rank cuts the same batches), then the
        stages exchange their layers; returns the epoch's mean stats (L, 3) on every rank."""
        cfg, comm, n_layers = self.cfg, self.comm, self.net.num_layers
        self.set_lr_factor(lr_factor(epoch, lr_epochs or cfg.epochs, cfg.lr_schedule))
        self._active_counts, self._active_rows = None, 0
        n = x.shape[0]
        order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
        starts = list(range(0, n, cfg.batch_size))
        rows = [min(cfg.batch_size, n - s) for s in starts]
        sizes_in = [self._message_size(self.first, b) for b in rows] if not self.is_first else []
        link = _Link(
            comm,
            sizes_in,
            x,
            None if self.is_first else comm.rank - 1,
            None if self.is_last else comm.rank + 1,
        )
        total = torch.zeros(n_layers, 3, dtype=x.dtype, device=x.device)
        shown = torch.zeros_like(total)
        t0 = time.perf_counter()
        for t, start in enumerate(starts):
            idx = order[start : start + cfg.batch_size]
            if not self.is_first:
                self._incoming = link.recv(t)
            self._outgoing = []
            stats = self.compute_gradients(x[idx], y[idx], generator, active)
            if not self.is_last:
                link.send(torch.cat([o.reshape(-1) for o in self._outgoing]))
            self.apply_gradients()
            own = stats[self.first : self.stop]
            total[self.first : self.stop] += own
            if on_batch is not None:
                shown[self.first : self.stop] = own
                on_batch(min(start + cfg.batch_size, n), shown)
        link.close()
        busy_end = time.perf_counter()
        self._exchange()
        comm.all_reduce_(total)
        if self._active_counts is not None:
            for count in self._active_counts:
                comm.all_reduce_(count)
        elapsed = busy_end - t0
        idle = torch.zeros(comm.world_size, dtype=torch.float64, device=comm.device)
        idle[comm.rank] = link.waited / max(elapsed, 1e-12)
        comm.all_reduce_(idle)
        sent = torch.zeros(comm.world_size, dtype=torch.float64, device=comm.device)
        sent[comm.rank] = link.sent_bytes / len(starts)
        comm.all_reduce_(sent)
        self._report = {
            "pipeline_stages": list(self.stages),
            "pipeline_idle": idle.tolist(),
            "pipeline_bubble": float(idle.mean()),
            "pipeline_fill_drain": fill_drain_bubble(comm.world_size, len(starts)),
            "pipeline_bytes_per_step": sent.tolist(),
            "pipeline_exchange_seconds": time.perf_counter() - busy_end,
        }
        return total / len(starts)

    def epoch_report(self) -> dict[str, Any]:
        """The last epoch's pipeline measurements: layers per stage, each stage's idle
        fraction (time spent waiting for a neighbour over the epoch's training time), their
        mean (the bubble), a balanced pipe's fill-and-drain fraction, bytes sent per batch by
        each stage, and the seconds of the end-of-epoch exchange."""
        return dict(self._report)

    # -- the end-of-epoch exchange -------------------------------------------------------------
    def _owned(self, rank: int) -> list[tuple[str, Tensor]]:
        """The parameters and buffers that stage ``rank`` trains, by state_dict name."""
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        last = rank == self.comm.world_size - 1

        def mine(name: str) -> bool:
            if name.startswith("head."):
                return last
            if name.startswith("layers."):
                return lo <= int(name.split(".")[1]) < hi
            if name.startswith("running_mean_"):
                return lo <= int(name.rsplit("_", 1)[1]) < hi
            return False

        named = [*self.net.named_parameters(), *self.net.named_buffers()]
        return [(k, v) for k, v in named if mine(k)]

    def _exchange(self) -> None:
        """Every stage sends its layers (values and optimizer state) to every rank."""
        state = self.optimizer.state
        for r in range(self.comm.world_size):
            payload = None
            if r == self.comm.rank:
                payload = {
                    k: (v.detach(), dict(state[v]) if v in state else None)
                    for k, v in self._owned(r)
                }
            payload = self.comm.broadcast(payload, src=r)
            if r == self.comm.rank:
                continue
            for k, v in self._owned(r):
                value, opt = payload[k]
                with torch.no_grad():
                    v.copy_(value)
                if opt is not None:
                    state[v] = {
                        key: s.to(v.device).clone() if isinstance(s, Tensor) else s
                        for key, s in opt.items()
                    }
