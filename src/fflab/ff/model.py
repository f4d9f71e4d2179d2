"""The Forward-Forward network: FF layers + ReLU with RMS normalization between them.

Shapes: ``B`` batch, ``D`` image features, ``C`` classes, ``H_l`` units of hidden layer ``l``.

The label enters only through the first layer, and a one-hot row has the same norm whatever
the label, so the image's product with the first layer's image columns is computed once and
shared by every label written over it (positive, negative, neutral, and all C candidates at
inference). :meth:`FFNet.first_layer` does this; :meth:`FFNet.activities` is the plain
reference path (embed label, normalize, multiply) that the tests compare it with. An
unsupervised net (``label_mode="none"``) takes the image alone.

Optional *boxes* (``FFNet(..., between=[...])``, one per gap between consecutive hidden
layers, see :mod:`fflab.ff.boxes`) map a layer's activities to the next layer's input before
its normalization, in every forward path here and in the reference trainer; they need no
gradient, since none crosses a layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fflab.ff.boxes import as_box
from fflab.ff.functional import (
    GOODNESS_KINDS,
    RMS_EPS,
    embed_label,
    ff_loss,
    goodness,
    positive_logit,
    rms_normalize,
)
from fflab.ff.layers import Dense

NEUTRAL = -1  # label value that stands for the neutral label (every label entry 0.1)


LABEL_MODES = ("overlay", "concat", "none")


@dataclass(frozen=True)
class FFNetConfig:
    """Architecture and goodness of an FF network.

    ``label_mode`` decides the mode: ``overlay`` or ``concat`` make a supervised net (the label
    is part of the input; negatives are wrong labels), ``none`` an unsupervised one (the input
    is the image alone; negatives are other images, and a linear probe reads the features).
    """

    in_features: int = 784
    num_classes: int = 10
    hidden: tuple[int, ...] = (1000, 1000, 1000)
    goodness: str = "sumsq"  # sumsq (paper) | meansq | minssq (paper's CIFAR-10 variant)
    threshold: float | None = None  # None: number of units (sumsq/minssq) or 1.0 (meansq)
    # concat (h0 = [y; x], safe for any data) | overlay (the label replaces the first
    # num_classes features: MNIST's blank border, the paper's run) | none (unsupervised)
    label_mode: str = "concat"
    # peer-normalization strength; 0.06 on fflab's true loss gradient is Hinton's 0.03 (his
    # update omits the factor 2 of d(sum a^2)/da, see FFTrainConfig.lr); 0 disables it
    peer_norm: float = 0.06
    peer_momentum: float = 0.9  # running-mean momentum of peer normalization
    score_from: int = 1  # goodness scoring sums hidden layers score_from.. (0-based)
    head_from: int = 1  # the softmax head (or probe) reads hidden layers head_from.. (0-based)
    # (channels, height, width) of the input image, () if it is not an image: hybrid
    # negatives and local layers need it
    image_shape: tuple[int, ...] = ()
    # local receptive fields: kernel size of each hidden layer (0: fully connected). A local
    # layer's units sit on a map, hidden[i] / (map locations) channels per location; its
    # padding is kernel // 2, its stride local_strides[i] (default 1)
    local_kernels: tuple[int, ...] = ()
    local_strides: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"hidden must be a non-empty list of positive sizes, got {self.hidden}"
            )
        if self.goodness not in GOODNESS_KINDS:
            raise ValueError(
                f"goodness must be one of {', '.join(GOODNESS_KINDS)}, got {self.goodness!r}"
            )
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be overlay, concat or none, got {self.label_mode!r}")
        if self.label_mode == "overlay" and self.in_features <= self.num_classes:
            raise ValueError("overlay needs more input features than classes")
        n = len(self.hidden)
        for name in ("score_from", "head_from"):
            v = getattr(self, name)
            if not 0 <= v < n:
                raise ValueError(f"{name} must be in 0..{n - 1} for {n} hidden layers, got {v}")
        if self.peer_norm < 0 or not 0 <= self.peer_momentum < 1:
            raise ValueError("peer_norm must be >= 0 and peer_momentum in [0, 1)")
        if self.image_shape and (
            len(self.image_shape) != 3 or math.prod(self.image_shape) != self.in_features
        ):
            raise ValueError(
                f"image_shape {self.image_shape} must be (channels, height, width) with "
                f"{self.in_features} = in_features values"
            )
        self.layer_shapes()  # checks the local layers' geometry

    @property
    def supervised(self) -> bool:
        return self.label_mode != "none"

    @property
    def input_width(self) -> int:
        """Width of the first layer's input (label included)."""
        extra = self.num_classes if self.label_mode == "concat" else 0
        return self.in_features + extra

    def kernel(self, layer: int) -> int:
        return self.local_kernels[layer] if layer < len(self.local_kernels) else 0

    def layer_shapes(self) -> list[tuple[int, int, int] | None]:
        """Output map (channels, height, width) of every hidden layer; None for dense ones."""
        k = self.local_kernels
        if len(k) > len(self.hidden) or len(self.local_strides) > len(k):
            raise ValueError("local_kernels and local_strides may not be longer than hidden")
        if any(v < 0 for v in k) or any(s < 1 for s in self.local_strides):
            raise ValueError("local kernels must be >= 0 and strides >= 1")
        if any(k) and self.supervised:
            raise ValueError("local layers need label_mode=none (the label has no location)")
        shapes: list[tuple[int, int, int] | None] = []
        below: tuple[int, ...] | None = tuple(self.image_shape) or None
        for i, width in enumerate(self.hidden):
            if not self.kernel(i):
                shapes.append(None)
                below = None
                continue
            if below is None:
                raise ValueError(
                    f"local layer {i} needs a map below it (model.image_shape for the first)"
                )
            kk = self.kernel(i)
            s = self.local_strides[i] if i < len(self.local_strides) else 1
            h, w = ((d + 2 * (kk // 2) - kk) // s + 1 for d in below[1:])
            if h < 1 or w < 1 or width % (h * w):
                raise ValueError(
                    f"hidden layer {i}: {width} units do not fill a {h}x{w} map evenly "
                    f"(kernel {kk}, stride {s} on {below[1]}x{below[2]}); use a multiple of {h * w}"
                )
            below = (width // (h * w), h, w)
            shapes.append(below)
        return shapes

    def theta(self, layer: int) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        return 1.0 if self.goodness == "meansq" else float(self.hidden[layer])


def build_layers(config: FFNetConfig, generator: torch.Generator | None = None) -> nn.ModuleList:
    """The stack of FF layers of ``config``: dense, or locally connected where a kernel is set.

    Layer ``i`` maps ``input_width`` (i = 0) or ``hidden[i - 1]`` features to ``hidden[i]``;
    weights are drawn from ``generator`` layer by layer.
    """
    widths = (config.input_width, *config.hidden)
    maps = [tuple(config.image_shape) or None, *config.layer_shapes()]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        kk = config.kernel(i)
        if kk:
            from fflab.ff.local import LocallyConnected2d

            stride = config.local_strides[i] if i < len(config.local_strides) else 1
            out_channels = maps[i + 1][0]
            layers.append(LocallyConnected2d(maps[i], out_channels, kk, stride, kk // 2, generator))
        else:
            layers.append(Dense(n_in, n_out, generator))
    return nn.ModuleList(layers)


class FFOutput(NamedTuple):
    """What :meth:`FFNet.forward` returns: each hidden layer's activities (B, H_l) and
    goodness (B, L)."""

    activities: list[Tensor]
    goodness: Tensor


class FFNet(nn.Module):
    """Forward-Forward network: FF layers with RMS normalization between them, a linear head.

    Layers follow :class:`fflab.ff.layers.FFLayer` (dense: weights N(0, 1/fan_in), biases 0, as
    in Hinton's code; or locally connected). The head is the softmax head of a supervised net
    (trained alongside, on a neutral-label pass) or the linear probe of an unsupervised one
    (trained after, on frozen features). The peer normalization running means are registered
    buffers, so they move with ``.to(device)`` and are saved in checkpoints.

    ``between`` (optional): one box per gap between consecutive hidden layers (``L - 1`` of
    them; ``None`` in a gap is the identity), each a module or a function (N, H_l) -> (N, H_l)
    applied to layer ``l``'s activities before layer ``l + 1`` normalizes them. Goodness, peer
    normalization and the head read each layer's own activities. Boxes are not part of
    :class:`FFNetConfig`, so a run built from a config has none. Both
    :class:`~fflab.ff.train.FFTrainer` and :class:`~fflab.ff.reference.ReferenceTrainer`
    apply them; a trainer that computes passes of its own without them (the layer pipeline)
    refuses such a net (:meth:`require_no_boxes`).
    """

    def __init__(
        self,
        config: FFNetConfig,
        generator: torch.Generator | None = None,
        between: Sequence[Callable[[Tensor], Tensor] | nn.Module | None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = build_layers(config, generator)
        boxes = [] if between is None else list(between)
        if between is not None and len(boxes) != len(config.hidden) - 1:
            raise ValueError(
                f"between needs one box (or None) per gap between hidden layers: "
                f"{len(config.hidden) - 1} for {len(config.hidden)} layers, got {len(boxes)}"
            )
        self.between = nn.ModuleList(as_box(b) for b in boxes)
        head_in = sum(config.hidden[config.head_from :])
        self.head = nn.Linear(head_in, config.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        for i, h in enumerate(config.hidden):
            self.register_buffer(f"running_mean_{i}", torch.full((h,), 0.5))

    # -- state ----------------------------------------------------------------------------
    def running_mean(self, layer: int) -> Tensor:
        return getattr(self, f"running_mean_{layer}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def theta(self, layer: int) -> float:
        return self.config.theta(layer)

    # -- boxes between layers -------------------------------------------------------------
    @property
    def has_boxes(self) -> bool:
        """Whether any gap holds a box other than the identity."""
        return any(not isinstance(b, nn.Identity) for b in self.between)

    def require_no_boxes(self, user: str) -> None:
        """Raise a ValueError naming ``user`` (a trainer that ignores boxes) if the net has
        any."""
        if self.has_boxes:
            raise ValueError(
                f"{user} does not apply the boxes between layers (FFNet between=...); "
                "train this net with fflab.ff.train.FFTrainer on one process"
            )

    def box(self, layer: int, a: Tensor) -> Tensor:
        """What layer ``layer + 1`` receives from layer ``layer``'s activities a (N, H_l),
        before its normalization: the gap's box of ``a``, or ``a`` itself."""
        return self.between[layer](a) if self.between else a

    # -- the first layer, shared across labels ------------------------------------------
    def image_part(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Label-independent part of the first layer: x (B, D) -> A (B, H_0), sq (B,).

        ``A`` is the image's product with the image columns of the first weight matrix and
        ``sq`` the image's squared norm (without the label pixels, which overlay replaces).
        """
        c = self.config.num_classes
        xr = x[:, c:] if self.config.label_mode == "overlay" else x  # (B, Dx)
        w = self.layers[0].weight[:, c:]  # (H_0, Dx)
        return xr @ w.T, xr.square().sum(1)

    def label_scale(self, sq: Tensor, neutral: bool) -> Tensor:
        """1 / RMS of the labelled input, from the image's squared norm sq (B,) -> (B,).

        A one-hot row adds 1 to the squared norm whatever the label; the neutral row adds 0.1.
        """
        label_sq = 0.1 * self.config.num_classes * 0.1 if neutral else 1.0
        return torch.rsqrt((sq + label_sq) / self.config.input_width + RMS_EPS)

    def first_layer(self, a_img: Tensor, scale: Tensor, labels: Tensor | None) -> Tensor:
        """Total input of the first layer for one label per image: (B, H_0), (B,), (B,).

        ``labels=None`` means the neutral label for every image.
        """
        layer = self.layers[0]
        wy = layer.weight[:, : self.config.num_classes]  # (H_0, C)
        label_in = 0.1 * wy.sum(1) if labels is None else wy.T[labels]  # (H_0,) or (B, H_0)
        return torch.addcmul(layer.bias, a_img + label_in, scale.unsqueeze(1))

    # -- reference path -------------------------------------------------------------------
    def embed(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """The first layer's input before normalization: x (B, D) -> (B, input_width).

        A supervised net writes the label in (``None``: the neutral label); an unsupervised
        net takes the image as it is.
        """
        c = self.config
        if not c.supervised:
            return x
        if labels is None:
            labels = torch.full((x.shape[0],), NEUTRAL, dtype=torch.long, device=x.device)
        return embed_label(x, labels, c.num_classes, c.label_mode)

    def activities(self, x: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """ReLU activities of every layer for images x (B, D) with labels (B,) (-1: neutral).

        The plain path: write the label, RMS-normalize, multiply; each layer's input is the
        RMS-normalized output of the one below.
        """
        h = self.embed(x, labels)
        out = []
        for i, layer in enumerate(self.layers):
            a = torch.relu(layer(rms_normalize(h)))
            out.append(a)
            if i + 1 < self.num_layers:
                h = self.box(i, a)
        return out

    def forward(self, x: Tensor, labels: Tensor | None = None) -> FFOutput:
        """Every hidden layer's activities and goodness for images x (B, D).

        ``labels`` (B,) are written into the input of a supervised net (None or -1: the
        neutral label); an unsupervised net takes none. Goodness is the configured function of
        each layer's activities, (B, L).
        """
        if labels is not None and not self.config.supervised:
            raise ValueError("an unsupervised net (label_mode=none) takes no labels")
        acts = self.activities(x, labels)
        g = torch.stack([goodness(a, self.config.goodness) for a in acts], dim=1)
        return FFOutput(acts, g)

    def layer_losses(self, x: Tensor, labels_pos: Tensor, labels_neg: Tensor) -> list[Tensor]:
        """Per-layer FF losses, each depending only on its own layer's parameters.

        Autograd path (inputs detached between layers): summing these and calling
        ``backward()`` gives each layer the gradient of its own loss only. The fast trainer
        computes the same gradients by hand; the tests check that they agree. Peer
        normalization is not part of these losses. A box's output enters the next layer as a
        constant (detached).
        """
        c = self.config
        hp = embed_label(x, labels_pos, c.num_classes, c.label_mode)
        hn = embed_label(x, labels_neg, c.num_classes, c.label_mode)
        losses = []
        for i, layer in enumerate(self.layers):
            ap = torch.relu(layer(rms_normalize(hp.detach())))
            an = torch.relu(layer(rms_normalize(hn.detach())))
            gp, gn = goodness(ap, c.goodness), goodness(an, c.goodness)
            losses.append(ff_loss(gp, gn, self.theta(i), c.goodness))
            if i + 1 < self.num_layers:
                hp, hn = self.box(i, ap.detach()), self.box(i, an.detach())
        return losses

    # -- inference ------------------------------------------------------------------------
    def rest_of_net(self, z0: Tensor) -> list[Tensor]:
        """Activities of all layers given the first layer's total input z0 (N, H_0)."""
        a = torch.relu(z0)
        out = [a]
        for i, layer in enumerate(self.layers[1:]):
            a = torch.relu(layer(rms_normalize(self.box(i, a))))
            out.append(a)
        return out

    @torch.no_grad()
    def label_goodness(self, x: Tensor) -> Tensor:
        """Goodness of every hidden layer for every candidate label: x (B, D) -> (B, C, L).

        One first-layer product with the image, shared by all C labels, then one batched pass
        of C*B rows (label-major) through the remaining layers.
        """
        c = self.config
        if not c.supervised:
            raise ValueError("an unsupervised net has no labels to score; use its probe")
        b = x.shape[0]
        a_img, sq = self.image_part(x)  # (B, H_0), (B,)
        scale = self.label_scale(sq, neutral=False)  # (B,)
        wy = self.layers[0].weight[:, : c.num_classes]  # (H_0, C)
        z0 = (a_img.unsqueeze(0) + wy.T.unsqueeze(1)) * scale.unsqueeze(1)  # (C, B, H_0)
        z0 = (z0 + self.layers[0].bias).reshape(c.num_classes * b, -1)  # (C*B, H_0)
        g = torch.stack([goodness(a, c.goodness) for a in self.rest_of_net(z0)], 1)
        return g.view(c.num_classes, b, -1).transpose(0, 1)  # (B, C, L)

    @torch.no_grad()
    def label_scores(self, x: Tensor, layers: Sequence[int] | None = None) -> Tensor:
        """Summed goodness logit of every candidate label: x (B, D) -> (B, C).

        ``layers`` (default: hidden layers ``score_from..``) chooses whose goodness counts.
        For ``minssq`` the score is the negated sum of squares, so the argmax is always the
        prediction.
        """
        c = self.config
        layers = range(c.score_from, self.num_layers) if layers is None else layers
        g = self.label_goodness(x)[..., list(layers)]  # (B, C, |layers|)
        return positive_logit(g, 0.0, c.goodness).sum(2)

    def head_features(self, acts: Sequence[Tensor]) -> Tensor:
        """Input of the softmax head: normalized activities of layers head_from.. (B, F)."""
        return torch.cat([rms_normalize(a) for a in acts[self.config.head_from :]], dim=1)

    @torch.no_grad()
    def neutral_activities(self, x: Tensor) -> list[Tensor]:
        """Activities of every layer for the neutral label: x (B, D) -> [(B, H_l)].

        For an unsupervised net, the activities of the image itself.
        """
        if not self.config.supervised:
            return self.activities(x)
        a_img, sq = self.image_part(x)
        return self.rest_of_net(self.first_layer(a_img, self.label_scale(sq, True), None))

    @torch.no_grad()
    def head_logits(self, x: Tensor) -> Tensor:
        """Softmax-head logits from one neutral-label pass: x (B, D) -> (B, C)."""
        return self.head(self.head_features(self.neutral_activities(x)))

    @torch.no_grad()
    def predict(self, x: Tensor, mode: str = "goodness") -> Tensor:
        """Predicted labels (B,) by ``goodness`` scoring or the ``softmax`` head."""
        if mode == "goodness":
            return self.label_scores(x).argmax(1)
        if mode == "softmax":
            return self.head_logits(x).argmax(1)
        raise ValueError(f"unknown inference mode {mode!r}; choose goodness or softmax")
