"""Training Forward-Forward networks: the fast, hand-derived step shared by every mode.

Every mode runs the same core: a positive phase and a negative phase stacked into one batch
(one matrix product per layer for both), each layer's goodness loss turned into ``dL/dz`` by
:func:`~fflab.ff.functional.goodness_loss_terms`, and each active layer's own parameter
gradients from its :meth:`~fflab.ff.layers.FFLayer.local_grad` (two matrix products per layer
and pass, forward and weight gradient; never a gradient with respect to a layer's input).
The negatives come from a registered :mod:`negative source <fflab.negatives>`.

- *Supervised* (``label_mode`` overlay or concat): a neutral-label pass first trains the
  softmax head and gives the source its probabilities (hard negatives); the first layer's
  image product is shared by all three passes, and positive and negative rows share one
  weight-gradient product there (they have the same input scale).
- *Unsupervised* (``label_mode=none``): the positive rows are the images, the negative rows
  the source's images (hybrids); every layer, local or dense, takes the generic path.

Boxes between layers (``FFNet(between=...)``, :mod:`fflab.ff.boxes`) are applied where the
next layer's input is made: layer ``l + 1`` reads the normalized output of box ``l`` on layer
``l``'s activities, which is a constant for it (no gradient crosses a layer anyway), while
goodness, peer normalization and the head read the layer's own activities.

Optional dropout (``FFTrainConfig.input_dropout``, ``dropout``) masks the image (in every
pass) and the inputs of layers 2..L (in the positive and negative passes).

Two schedules (``FFTrainConfig.step_schedule``) give the same update bit for bit:
``forward_first`` (the default) runs every layer's forward pass and then every layer's
gradients, so all layers' activities and inputs (2B rows each) are alive together;
``layerwise`` computes each layer's gradients as soon as its activities exist and drops its
input before the layer above is multiplied, so one layer's activities are alive at a time
(and the neutral pass keeps only the head's features), which is what makes FF's memory
independent of depth (``fflab study memory`` measures both).

The gradients equal autograd's in :class:`fflab.ff.reference.ReferenceTrainer` (checked in
the tests, float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fflab.ff.functional import RMS_EPS, dropout_mask, goodness_loss_terms, peer_norm_dz
from fflab.ff.layers import write_grad
from fflab.ff.model import FFNet
from fflab.negatives import NEGATIVE_SOURCES, NegativeSource, make_source
from fflab.optim import SmoothedSGD, lr_factor


def _sumsq(a: Tensor) -> Tensor:
    """Sum of squares of each row: (N, H) -> (N,), one read of ``a`` (no squared copy)."""
    return torch.linalg.vector_norm(a, dim=1).square_()


def _normalized(a: Tensor, ssq: Tensor) -> Tensor:
    """``rms_normalize(a)`` from the rows' known sums of squares: (N, H), (N,) -> (N, H)."""
    return a * torch.rsqrt(ssq / a.shape[1] + RMS_EPS).unsqueeze(1)


STEP_SCHEDULES = ("forward_first", "layerwise")


@dataclass(frozen=True)
class FFTrainConfig:
    """Optimization of an FF network (defaults: Hinton's released code)."""

    epochs: int = 100  # epochs (per layer when layer_schedule is greedy)
    batch_size: int = 100
    optimizer: str = "sgd"  # sgd (smoothed gradient + weight cost, Hinton's) | adam
    # Hinton's code steps along (1 - p) * a, half the true gradient 2 * (1 - p) * a of the
    # logistic loss that fflab differentiates; lr 0.005 here is his 0.01.
    lr: float = 0.005
    momentum: float = 0.9  # gradient smoothing: inc = momentum * inc + (1 - momentum) * grad
    # L2 weight decay on FF weights (not biases), p -= lr * weight_cost * p per step. His cost
    # 0.001 is taken at his lr 0.01, so the same decay per step at lr 0.005 is 0.002.
    weight_cost: float = 0.002
    head_lr: float = 0.1
    head_weight_cost: float = 0.003
    lr_schedule: str = "hinton"  # hinton: constant for half the epochs, then linear to 0 | constant
    # negative source (fflab.negatives): hard (wrong label sampled from the softmax head) |
    # random (uniform wrong label) for a supervised net; hybrid (two images under a blurred
    # mask) | permuted (pixels shuffled) | unmasked (another image) for an unsupervised one
    negatives: str = "hard"
    # hybrid negatives: passes of the [1/4, 1/2, 1/4] blur (the paper gives no number; 6 makes
    # regions of roughly digit-stroke size, see fflab.negatives.blur_mask), and whether the
    # second image must be of another class (uses labels: not strictly unsupervised)
    blurs: int = 6
    hybrid_different_class: bool = False
    layer_schedule: str = "simultaneous"  # simultaneous (every layer, every batch) | greedy
    # dropout while training (0: off): input_dropout on the image pixels (one mask per image,
    # shared by its positive, negative and neutral rows); dropout on the normalized
    # activities entering every layer above the first, in the positive and negative passes
    input_dropout: float = 0.0
    dropout: float = 0.0
    # order of a step's work: forward_first (every layer's forward pass, then every layer's
    # gradients; all layers' activities alive together) | layerwise (each layer's gradients
    # right after its own forward pass, its activities freed before the layer above is
    # computed: one layer's alive at a time, so the step's memory is flat in depth; the same
    # update in about the same time, see fflab study memory)
    step_schedule: str = "forward_first"
    log_test_error: bool = False  # log test error per epoch (time-to-accuracy curves only)
    # the linear probe of an unsupervised net, trained after FF on frozen features: Adam,
    # batch 100 (defaults chosen on a validation split: see fflab.ff.probe.ProbeConfig)
    probe_epochs: int = 40
    probe_lr: float = 1e-4
    probe_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.lr_schedule not in ("hinton", "constant"):
            raise ValueError(f"lr_schedule must be hinton or constant, got {self.lr_schedule!r}")
        if self.negatives not in NEGATIVE_SOURCES:
            known = ", ".join(sorted(NEGATIVE_SOURCES))
            raise ValueError(f"negatives must be one of {known}, got {self.negatives!r}")
        if self.blurs < 0 or self.probe_epochs < 0 or self.probe_lr <= 0:
            raise ValueError("blurs and probe_epochs must be >= 0, probe_lr > 0")
        if self.layer_schedule not in ("simultaneous", "greedy"):
            raise ValueError("layer_schedule must be simultaneous or greedy")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("learning rates must be > 0")
        if not (0 <= self.input_dropout < 1 and 0 <= self.dropout < 1):
            raise ValueError("input_dropout and dropout must be in [0, 1)")
        if self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(
                f"step_schedule must be forward_first or layerwise, got {self.step_schedule!r}"
            )


def make_optimizer(net: torch.nn.Module, cfg: FFTrainConfig) -> torch.optim.Optimizer:
    """One optimizer, four groups: FF weights, FF biases, head weight, head bias.

    The FF parameters are every parameter outside ``net.head``, in registration order,
    grouped by name (``...weight`` or ``...bias``): an FFNet's layers, or a recurrent net's
    bottom-up and top-down weights.
    """
    ff = [(n, p) for n, p in net.named_parameters() if not n.startswith("head.")]
    weights = [p for n, p in ff if n.endswith("weight")]
    biases = [p for n, p in ff if n.endswith("bias")]
    groups = [
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_cost},
        {"params": biases, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [net.head.weight], "lr": cfg.head_lr, "weight_decay": cfg.head_weight_cost},
        {"params": [net.head.bias], "lr": cfg.head_lr, "weight_decay": 0.0},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups)
    return SmoothedSGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def negative_source(net: FFNet, cfg: FFTrainConfig) -> NegativeSource:
    """The negative source ``cfg.negatives`` for ``net``, checked against its mode."""
    c = net.config
    cls = NEGATIVE_SOURCES[cfg.negatives]
    if cls.labelled != c.supervised:
        want = "overlay or concat" if cls.labelled else "none"
        raise ValueError(
            f"negatives={cfg.negatives} needs model.label_mode={want} "
            f"(the net's label_mode is {c.label_mode})"
        )
    if cls.labelled:
        return make_source(cfg.negatives, num_classes=c.num_classes)
    if not c.image_shape:
        raise ValueError(f"negatives={cfg.negatives} needs model.image_shape (C, H, W)")
    return make_source(
        cfg.negatives,
        image_shape=tuple(c.image_shape[1:]),
        blurs=cfg.blurs,
        different_class=cfg.hybrid_different_class,
    )


class FFTrainer:
    """The fast FF step for every mode: owns the optimizer and a negative source.

    A step is :meth:`compute_gradients` (the positive and negative phases and every layer's
    local gradients) then :meth:`apply_gradients` (the optimizer), so that whatever must see
    the gradients (an all-reduce across processes) can sit between the two. With ``fused``
    (the default for SmoothedSGD) the weight gradients are folded straight into the
    optimizer's smoothed gradient, which is linear in the gradient; otherwise they are written
    to ``.grad``. The plain statement of the same step is :class:`fflab.ff.reference.
    ReferenceTrainer`; the tests hold the two equal.
    """

    def __init__(self, net: FFNet, cfg: FFTrainConfig) -> None:
        if cfg.step_schedule == "layerwise" and not isinstance(net, FFNet):
            raise ValueError("step_schedule=layerwise needs a feed-forward FFNet")
        self.net = net
        # FFNet(between=...): boxes other than the identity, applied by _next_input
        self._boxes = bool(getattr(net, "has_boxes", False))
        self.cfg = cfg
        self.layerwise = cfg.step_schedule == "layerwise"
        self.source = negative_source(net, cfg)
        self.optimizer = make_optimizer(net, cfg)
        # SmoothedSGD takes weight gradients as products folded into its smoothed gradient
        # (see SmoothedSGD.fold_product_); set False to have them written to .grad instead
        self.fused = isinstance(self.optimizer, SmoothedSGD)
        self._cache: dict[tuple, tuple[Tensor, ...]] = {}
        self._layers = list(net.layers)  # slicing a ModuleList builds a new module each time
        # the layers this trainer's passes run (a pipeline stage runs a block of them)
        self._span = range(len(self._layers))
        self._inactive: list[int] = []
        # per unit, the positive rows it was active on this epoch (see unit_activity)
        self._active_counts: list[Tensor] | None = None
        self._active_rows = 0

    def set_lr_factor(self, factor: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    def _pass(
        self, z0: Tensor, normalize_last: bool = False, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Activities, sums of squares and normalized inputs from first-layer input z0 (N, H_0).

        The pass runs the layers of ``self._span`` (all of them, unless a pipeline stage
        runs a block), z0 being the total input of the span's first layer; the lists are
        indexed from it.

        The sum of squares of a layer's activities is both its goodness and (divided by the
        width) the mean square that normalizes it for the next layer, so it is computed once.
        ``inputs[i]`` (i >= 1) is layer i's input, the normalized activities of layer i - 1;
        with ``normalize_last`` the last layer's normalized activities are appended too.
        With a ``generator`` and ``cfg.dropout > 0``, every ``inputs[i]`` (i >= 1) is dropped
        out (the same tensor enters the layer's product and its weight gradient).
        """
        p = self.cfg.dropout if generator is not None else 0.0
        a = torch.relu_(z0)
        acts, ssq, inputs = [a], [_sumsq(a)], [z0]  # inputs[0]: set by the caller
        for i in range(self._span.start + 1, self._span.stop):
            h = self._next_input(i - 1, a, ssq[-1])
            if p > 0:
                h.mul_(self._dropout_mask(h.shape, p, generator, h))
            a = torch.relu_(self._layers[i](h))
            acts.append(a)
            ssq.append(_sumsq(a))
            inputs.append(h)
        if normalize_last:
            inputs.append(_normalized(a, ssq[-1]))
        return acts, ssq, inputs

    def _next_input(self, i: int, a: Tensor, ssq: Tensor) -> Tensor:
        """Layer ``i + 1``'s input from layer i's activities a (N, H_i) and their sums of
        squares ssq (N,): ``a`` normalized, or, where the gap holds a box, the box's output
        normalized (the box sees the activities under no_grad, so its output is a constant)."""
        if self._boxes:
            a = self.net.box(i, a)
            ssq = _sumsq(a)
        return _normalized(a, ssq)

    @torch.no_grad()
    def step(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        """One update on images x (B, D) with labels y (B,); returns per-layer stats (L, 3).

        Columns of the stats: FF loss, mean positive goodness, mean negative goodness.
        ``active`` lists the layers that learn (default: all); the head always learns.
        """
        stats = self.compute_gradients(x, y, generator, active)
        self.apply_gradients()
        return stats

    @torch.no_grad()
    def compute_gradients(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range | None = None
    ) -> Tensor:
        """Both phases and every active layer's local gradients; returns the stats (L, 3).

        An unsupervised net ignores ``y`` except where its negative source reads it.
        """
        n_layers = self.net.num_layers
        active = range(n_layers) if active is None else active
        if self.cfg.input_dropout > 0:
            x = x * dropout_mask(x.shape, self.cfg.input_dropout, generator, x)
        if self.net.config.supervised:
            stats = self._supervised(x, y, generator, active)
        else:
            stats = self._unsupervised(x, y, generator, active)
        self._inactive = [i for i in range(n_layers) if i not in active]
        return stats

    def apply_gradients(self) -> None:
        """One optimizer step on the gradients of :meth:`compute_gradients`."""
        for i in self._inactive:
            self._layers[i].weight.grad = self._layers[i].bias.grad = None
        self.optimizer.step()

    def _local_gradients(
        self, acts: list[Tensor], inputs: list[Tensor], coef: Tensor, active: range, first=None
    ) -> None:
        """Every active layer's gradients from its activities, input and loss coefficients.

        ``acts[i]`` (2B, H_i) stacks positive rows over negative ones, ``coef`` (L, 2B) is
        ``dL/dz = coef * a``. Peer normalization adds its term to the positive rows. ``first``
        (a function of dz) replaces the generic gradient of layer 0 (the supervised step's
        shared image product).
        """
        b = acts[0].shape[0] // 2
        self._count_active([a[:b] for a in acts])
        for i in active:
            self._layer_gradient(i, acts[i], inputs[i], coef[i], first)

    def _layer_gradient(self, i: int, a: Tensor, h: Tensor | None, coef: Tensor, first=None):
        """Layer i's gradients from its activities a (2B, H_i), its input h and ``coef`` (2B,)
        (``dL/dz = coef * a``, plus peer normalization's term on the positive rows)."""
        net, c = self.net, self.net.config
        b = a.shape[0] // 2
        dz = a * coef.unsqueeze(1)  # (2B, H_i)
        if c.peer_norm > 0:
            rm = net.running_mean(i)
            rm.lerp_(self._batch_mean(a[:b]), 1 - c.peer_momentum)
            dz[:b].add_(peer_norm_dz(rm, c.peer_norm, b))
        if i == 0 and first is not None:
            first(dz)
        else:
            self._layers[i].local_grad(h, dz, self._param_grad)

    def _layerwise(self, start, b: int, x: Tensor, active: range, generator, first=None):
        """The positive and negative phases one layer at a time; returns the stats (L, 3).

        ``start()`` gives layer 0's total input (2B, H_0) and its input (None when ``first``
        computes layer 0's gradients). Each active layer's gradients are computed as soon as
        its activities exist, and its input is dropped before the layer above is multiplied,
        so one layer's activities (with its input and ``dz``) are alive at a time. The work
        and the random draws are those of the forward-first schedule, in the same order.
        """
        c, p = self.net.config, self.cfg.dropout
        widths, theta, target, _ = self._constants(b, x)
        if self._active_counts is None:
            self._active_counts = [torch.zeros(h, device=x.device) for h in c.hidden]
        # every layer's sums of squares (L, 2B), filled in as the layers are computed; layer
        # i's coefficients are read from the terms of the whole table (the rows above are
        # still 0), so that each value is computed at the place it has in the forward-first
        # step's table: vectorized elementwise kernels may round a tensor's tail differently
        ssq = target.new_zeros(target.shape)
        a, h = start()
        a = torch.relu_(a)
        for i, layer in enumerate(self._layers):
            if i > 0:
                h = self._next_input(i - 1, a, ssq[i - 1])
                if p > 0:
                    h.mul_(self._dropout_mask(h.shape, p, generator, h))
                a = None  # the layer below's activities are spent
                a = torch.relu_(layer(h))
            ssq[i] = _sumsq(a)
            self._active_counts[i] += (a[:b] > 0).sum(0)
            if i in active:
                _, coef = goodness_loss_terms(ssq, theta, widths, target, c.goodness)
                self._layer_gradient(i, a, h, coef[i], first)
            h = None  # this layer's input is spent
        self._active_rows += b
        stats, _ = goodness_loss_terms(ssq, theta, widths, target, c.goodness)
        return stats

    def _count_active(self, positive: list[Tensor]) -> None:
        """Add, per unit, the positive rows (N, H_l) on which it is active (> 0) to the
        epoch's counts (:meth:`unit_activity`)."""
        if self._active_counts is None:
            self._active_counts = [torch.zeros(a.shape[1], device=a.device) for a in positive]
        for count, a in zip(self._active_counts, positive, strict=True):
            count += (a > 0).sum(0)
        self._active_rows += positive[0].shape[0]

    def unit_activity(self) -> list[tuple[float, float]]:
        """Per layer, the fractions of units never active (dead) and active on every positive
        row (always on) since the last :meth:`train_epoch` began; empty before any step."""
        if self._active_counts is None:
            return []
        rows = self._active_rows
        return [
            (float((c == 0).double().mean()), float((c == rows).double().mean()))
            for c in self._active_counts
        ]

    def _batch_mean(self, a: Tensor) -> Tensor:
        """Mean of the rows of a (N, H) -> (H,): peer normalization's batch statistic (a
        data-parallel trainer averages it over the processes)."""
        return a.mean(0)

    def _dropout_mask(self, shape, p: float, generator: torch.Generator, like: Tensor) -> Tensor:
        """A hidden layer's dropout mask (:func:`dropout_mask`); a data-parallel trainer draws
        the whole global batch's and keeps its rows."""
        return dropout_mask(shape, p, generator, like)

    def _unsupervised(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range
    ) -> Tensor:
        """Positive phase on the images, negative phase on the source's images, stacked."""
        neg = self.source.draw(x, y, generator)
        if self.layerwise:

            def start() -> tuple[Tensor, Tensor]:
                h0 = torch.cat([x, neg.x])  # (2B, D): rows [:B] positive, [B:] negative
                h0 = _normalized(h0, _sumsq(h0))
                return self._layers[0](h0), h0

            return self._layerwise(start, x.shape[0], x, active, generator)
        h0 = torch.cat([x, neg.x])  # (2B, D): rows [:B] positive, [B:] negative
        h0 = _normalized(h0, _sumsq(h0))
        widths, theta, target, _ = self._constants(x.shape[0], x)
        acts, ssq, inputs = self._pass(self._layers[0](h0), generator=generator)
        inputs[0] = h0
        kind = self.net.config.goodness
        stats, coef = goodness_loss_terms(torch.stack(ssq), theta, widths, target, kind)
        self._local_gradients(acts, inputs, coef, active)
        return stats

    def _supervised(
        self, x: Tensor, y: Tensor, generator: torch.Generator, active: range
    ) -> Tensor:
        """The supervised step: neutral phase (head, negatives), then positive and negative.

        The first layer's image product is shared by all three passes, and the positive and
        negative rows of an image share one weight-gradient product there.
        """
        net, c, b = self.net, self.net.config, x.shape[0]
        a_img, sq = net.image_part(x)  # (B, H_0), (B,): shared by every pass
        widths, theta, target, eye = self._constants(b, x)
        y_neg = self._neutral_phase(x, a_img, sq, y, eye, generator)

        # positive and negative phases stacked: rows [:B] positive, [B:] negative
        labels = torch.cat([y, y_neg])  # (2B,)
        s_lab = net.label_scale(sq, neutral=False)  # (B,) one-hot label: same for pos and neg
        s2 = s_lab.repeat(2).unsqueeze(1)  # (2B, 1)
        label_in = eye.index_select(0, labels).mul_(s2)  # (2B, C): the scaled one-hot rows
        first = lambda dz: self._first_layer_grad(x, dz, s_lab, label_in)  # noqa: E731
        if self.layerwise:
            start = lambda: (self._labelled_first_layer(a_img, labels, s2), None)  # noqa: E731
            return self._layerwise(start, b, x, active, generator, first)
        z0 = self._labelled_first_layer(a_img, labels, s2)
        acts, ssq, inputs = self._pass(z0, generator=generator)
        stats, coef = goodness_loss_terms(torch.stack(ssq), theta, widths, target, c.goodness)
        self._local_gradients(acts, inputs, coef, active, first)
        return stats

    def _neutral_phase(
        self,
        x: Tensor,
        a_img: Tensor,
        sq: Tensor,
        y: Tensor,
        eye: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        """The neutral-label pass: trains the softmax head, returns negative labels (B,).

        The head reads the normalized activities of layers head_from.. (``inputs[head_from +
        1:]`` of the pass); the negative source sees its probabilities before it learns.
        """
        net, c = self.net, self.net.config
        if self.layerwise:
            feats = self._neutral_features(net.first_layer(a_img, net.label_scale(sq, True), None))
            return self._head_phase(x, y, feats, eye, generator)
        z0 = net.first_layer(a_img, net.label_scale(sq, True), None)
        acts, ssq, inputs = self._pass(z0, normalize_last=True)
        if self._boxes:  # the inputs above the first are boxes' outputs: the head reads acts
            inputs = [None] + [_normalized(a, s) for a, s in zip(acts, ssq, strict=True)]
        feats = torch.cat(inputs[c.head_from + 1 :], 1)  # (B, F)
        return self._head_phase(x, y, feats, eye, generator)

    def _neutral_features(self, z0: Tensor) -> Tensor:
        """The head's features (B, F) from the neutral pass's z0 (B, H_0), one layer alive at
        a time: each normalized layer head_from.. is copied into its columns as it is made
        (the values of the forward-first pass's ``inputs[head_from + 1:]``)."""
        c = self.net.config
        feats = z0.new_empty(z0.shape[0], sum(c.hidden[c.head_from :]))  # (B, F)
        a, col, n = torch.relu_(z0), 0, len(self._layers)
        del z0
        for i in range(n):
            s = _sumsq(a)
            h = _normalized(a, s)
            if i >= c.head_from:
                feats[:, col : col + h.shape[1]].copy_(h)
                col += h.shape[1]
            if i + 1 < n:
                nxt = self._next_input(i, a, s) if self._boxes else h
                a = None
                a = torch.relu_(self._layers[i + 1](nxt))
            h = nxt = None
        return feats

    def _head_phase(
        self, x: Tensor, y: Tensor, feats: Tensor, eye: Tensor, generator: torch.Generator
    ) -> Tensor:
        """The softmax head on features (B, F): its gradients, and negative labels (B,).

        The negative source sees the head's probabilities before the head learns.
        """
        probs = torch.softmax(self.net.head(feats), 1)  # (B, C)
        neg = self.source.draw(x, y, generator, probs)
        if neg.x is not x or neg.y is None:
            raise ValueError(f"negative source {self.source.name!r} must keep the image")
        self._head_gradient(y, feats, eye, probs)
        return neg.y

    def _head_gradient(self, y: Tensor, feats: Tensor, eye: Tensor, probs: Tensor) -> None:
        """The head's gradients of its cross-entropy on features (B, F) with labels (B,),
        from its probabilities (B, C) (spent: overwritten)."""
        head = self.net.head
        dlogits = probs.sub_(eye.index_select(0, y)).div_(y.shape[0])  # (B, C)
        self._param_grad(head.weight, dlogits.T, feats)
        self._param_grad(head.bias, dlogits.sum(0))

    def _labelled_first_layer(self, a_img: Tensor, labels: Tensor, s2: Tensor) -> Tensor:
        """Total input of layer 0 for the stacked rows: (B, H_0), (2B,), (2B, 1) -> (2B, H_0).

        The image part ``a_img`` is shared by the positive and the negative row of an image;
        a label adds its column of the first weight matrix, scaled like the image by ``s2``.
        """
        layer, b, k = self._layers[0], a_img.shape[0], self.net.config.num_classes
        z_img = torch.addcmul(layer.bias, a_img, s2[:b])  # (B, H_0)
        wy = layer.weight[:, :k].T.contiguous()  # (C, H_0): rows gathered, so made contiguous
        return torch.addcmul(z_img.repeat(2, 1), wy.index_select(0, labels), s2)

    def _constants(self, b: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-shape constants of a step at batch size ``b``, made once per dtype and device.

        Layer widths and thresholds (L, 1), the loss targets (L, 2B) (1 for the positive rows
        [:B], 0 for the negative rows) and the identity (C, C), whose rows are one-hot labels.
        """
        key = (b, like.dtype, like.device)
        if key not in self._cache:
            net, opts = self.net, {"dtype": like.dtype, "device": like.device}
            widths = torch.tensor(net.config.hidden, **opts).unsqueeze(1)
            theta = torch.tensor([net.theta(i) for i in range(net.num_layers)], **opts)
            target = torch.zeros(net.num_layers, 2 * b, **opts)
            target[:, :b] = 1.0
            eye = torch.eye(net.config.num_classes, **opts)
            self._cache[key] = (widths, theta.unsqueeze(1), target, eye)
        return self._cache[key]

    def _param_grad(
        self, w: Tensor, a: Tensor, b: Tensor | None = None, columns: slice = slice(None)
    ) -> None:
        """The trainer's gradient sink: the gradient of ``w[..., columns]`` is ``a @ b`` (or
        ``a``). Fused: folded into SmoothedSGD's smoothed gradient (a product by one GEMM).
        Otherwise written into ``w.grad`` (:func:`fflab.ff.layers.write_grad`).
        """
        if not self.fused:
            write_grad(w, a, b, columns)
        elif b is None:
            self.optimizer.fold_(w, a, columns)
        else:
            self.optimizer.fold_product_(w, a, b, columns)

    def _first_layer_grad(self, x: Tensor, dz: Tensor, scale: Tensor, label_in: Tensor) -> None:
        """Gradients of layer 0, whose input is ``scale * [label; image]``.

        ``dz`` (2B, H_0) stacks positive and negative rows, which share the image and the
        scale (B,), so the image columns need one product of their sum; the label columns are
        the product of ``dz`` with the rows' scaled one-hot labels ``label_in`` (2B, C).
        """
        c, b = self.net.config, x.shape[0]
        k, w = c.num_classes, self._layers[0].weight  # w: (H_0, C + Dx)
        xr = x[:, k:] if c.label_mode == "overlay" else x  # (B, Dx)
        dz_img = torch.add(dz[:b], dz[b:]).mul_(scale.unsqueeze(1))  # (B, H_0)
        self._param_grad(w, dz_img.T, xr, slice(k, None))
        self._param_grad(w, dz.T, label_in, slice(None, k))
        self._param_grad(self._layers[0].bias, dz.sum(0))

    def train_epoch(
        self,
        x: Tensor,
        y: Tensor,
        epoch: int,
        generator: torch.Generator,
        active: range | None = None,
        lr_epochs: int | None = None,
        on_batch=None,
    ) -> Tensor:
        """One pass over (x, y) in a random order; returns the epoch's mean stats (L, 3).

        ``lr_epochs`` is the length of the learning-rate schedule that ``epoch`` is in
        (default: the configured epochs). ``on_batch(n_seen, stats)`` is called after every
        minibatch, for progress bars.
        """
        cfg = self.cfg
        self.set_lr_factor(lr_factor(epoch, lr_epochs or cfg.epochs, cfg.lr_schedule))
        self._active_counts, self._active_rows = None, 0
        n = x.shape[0]
        order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
        total = torch.zeros(self.net.num_layers, 3, dtype=x.dtype, device=x.device)
        batches = 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            stats = self.step(x[idx], y[idx], generator, active)
            total += stats
            batches += 1
            if on_batch is not None:
                on_batch(min(start + cfg.batch_size, n), stats)
        return total / batches
