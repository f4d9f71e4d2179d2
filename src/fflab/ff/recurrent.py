"""Recurrent FF with top-down connections: an image shown as a static video.

The paper's network that lets higher layers influence lower ones without backprop. Layers, from
the bottom: the image ``x`` (D), hidden layers ``0..L-1`` (``H_i`` units), the label (C, one-hot)
at the top. Shapes: ``B`` rows (an image and a label each), ``T`` iterations.

- **Start** (``t = 0``): one bottom-up pass, ``s_i^0 = relu(up_i(n(s_{i-1}^0)))`` with
  ``s_{-1} = x``; the label plays no part, so one pass serves every label.
- **Update** (``t = 1..T``), all layers at once from the states at ``t - 1``::

      z_i^t = up_i(n(s_{i-1}^{t-1})) + down_i(n(s_{i+1}^{t-1}))      (s_L = the one-hot label)
      s_i^t = damping * s_i^{t-1} + (1 - damping) * relu(z_i^t)

  ``n`` is RMS normalization (of the image and the label too, every one of which is constant
  in time); ``up_i`` is an FF layer of :mod:`fflab.ff.layers` (dense or locally connected,
  with the layer's bias), ``down_i`` a dense map without bias.
- **Goodness** of layer ``i`` at iteration ``t`` is the configured function of ``s_i^t``.
  Training: each iteration's goodness is that layer's FF objective, positive with the correct
  label at the top, negative with a wrong one; learning is local in layer and in time (no
  gradient crosses a layer or an iteration). Test: for each candidate label run the iterations
  and pick the label whose goodness, summed over the scoring window and layers, is highest.

What the paper states (Hinton 2022, section 4; MNIST, 1.31% test error): two or three hidden
layers of 2000 ReLUs; 60 epochs; synchronous updates with damping (0.3 of the previous
pre-normalized state plus 0.7 of the new one); 8 iterations; initialization by a single
bottom-up pass; negatives with a wrong label drawn in proportion to the class probabilities of
a single forward pass; test by the goodness averaged over iterations 3 to 5. fflab's choices
where it is silent: which iterations' losses train (``train_from``..``iterations``, default
all), which layers' goodness scores (``score_from``.., default all), and where the class
probabilities come from: a softmax head on the normalized bottom-up states (layers
``head_from``..), trained alongside on their cross-entropy, which is also the network's
softmax-head predictor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fflab.ff.functional import GOODNESS_KINDS, goodness, positive_logit, rms_normalize
from fflab.ff.layers import Dense
from fflab.ff.model import FFNetConfig, build_layers


@dataclass(frozen=True)
class RecurrentFFConfig:
    """Architecture, dynamics and scoring of a recurrent FF network.

    Iterations are numbered from 1 (the first update after the bottom-up start, ``t = 0``);
    ``score_window`` and ``train_from`` are inclusive 1-based iteration numbers.
    """

    in_features: int = 784
    num_classes: int = 10
    hidden: tuple[int, ...] = (2000, 2000, 2000)
    goodness: str = "sumsq"
    threshold: float | None = None  # None: number of units (sumsq/minssq) or 1.0 (meansq)
    damping: float = 0.3  # weight of the old state: s = damping * s + (1 - damping) * relu(z)
    iterations: int = 8  # synchronous updates per image in training
    train_from: int = 1  # the losses of iterations train_from..iterations train
    score_window: tuple[int, int] = (3, 5)  # test: goodness summed over these iterations
    score_from: int = 0  # test: goodness of hidden layers score_from.. (0-based) counts
    head_from: int = 0  # the softmax head reads the bottom-up states of layers head_from..
    peer_norm: float = 0.0  # peer-normalization strength (see FFNetConfig); 0 disables it
    peer_momentum: float = 0.9
    # local receptive fields for the bottom-up weights, as in FFNetConfig (top-down weights
    # are dense): (channels, height, width) of the image, kernel and stride per hidden layer
    image_shape: tuple[int, ...] = ()
    local_kernels: tuple[int, ...] = ()
    local_strides: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.goodness not in GOODNESS_KINDS:
            raise ValueError(
                f"goodness must be one of {', '.join(GOODNESS_KINDS)}, got {self.goodness!r}"
            )
        if not 0 <= self.damping < 1:
            raise ValueError(f"damping must be in [0, 1), got {self.damping}")
        if self.iterations < 1 or not 1 <= self.train_from <= self.iterations:
            raise ValueError("iterations must be >= 1 and train_from in 1..iterations")
        lo, hi = (tuple(self.score_window) + (0, 0))[:2]
        if len(self.score_window) != 2 or not 1 <= lo <= hi:
            raise ValueError(
                f"score_window must be two iterations (first, last), 1 <= first <= last, "
                f"got {self.score_window}"
            )
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        self.stack()  # checks widths, layer indices, peer settings and local geometry

    def stack(self) -> FFNetConfig:
        """The bottom-up stack as an (unsupervised) FF config: widths, local layers, checks."""
        return FFNetConfig(
            in_features=self.in_features,
            num_classes=self.num_classes,
            hidden=tuple(self.hidden),
            goodness=self.goodness,
            threshold=self.threshold,
            label_mode="none",
            peer_norm=self.peer_norm,
            peer_momentum=self.peer_momentum,
            score_from=self.score_from,
            head_from=self.head_from,
            image_shape=tuple(self.image_shape),
            local_kernels=tuple(self.local_kernels),
            local_strides=tuple(self.local_strides),
        )

    @property
    def supervised(self) -> bool:
        return True  # the label is the top layer: negatives are wrong labels

    def theta(self, layer: int) -> float:
        return self.stack().theta(layer)


class RecurrentOutput(NamedTuple):
    """What :meth:`RecurrentFFNet.forward` returns: each hidden layer's final state (B, H_i),
    and every layer's goodness at every iteration (B, T, L)."""

    activities: list[Tensor]
    goodness: Tensor


class RecurrentFFNet(nn.Module):
    """Recurrent FF network: bottom-up FF layers ``up``, top-down dense maps ``down``, a head.

    ``down[i]`` maps the normalized state of the layer above (the label for the top layer) to
    layer ``i``. Weights N(0, 1/fan_in), biases 0; the head starts at zero. Peer-normalization
    running means are registered buffers.
    """

    def __init__(self, config: RecurrentFFConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.up = build_layers(config.stack(), generator)
        above = (*config.hidden[1:], config.num_classes)
        self.down = nn.ModuleList(
            Dense(n_in, n_out, generator, bias=False)
            for n_in, n_out in zip(above, config.hidden, strict=True)
        )
        self.head = nn.Linear(sum(config.hidden[config.head_from :]), config.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        for i, h in enumerate(config.hidden):
            self.register_buffer(f"running_mean_{i}", torch.full((h,), 0.5))

    @property
    def layers(self) -> nn.ModuleList:
        """The bottom-up FF layers (what FF code that walks ``net.layers`` expects)."""
        return self.up

    @property
    def num_layers(self) -> int:
        return len(self.up)

    def theta(self, layer: int) -> float:
        return self.config.theta(layer)

    def running_mean(self, layer: int) -> Tensor:
        return getattr(self, f"running_mean_{layer}")

    def label_input(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """The top layer's normalized state: labels (N,) -> n(one-hot) (N, C)."""
        eye = torch.eye(self.config.num_classes, dtype=dtype, device=labels.device)
        return rms_normalize(eye).index_select(0, labels)

    # -- the plain path ---------------------------------------------------------------------
    def bottom_up(self, x: Tensor) -> list[Tensor]:
        """The start states ``s_i^0``: one bottom-up pass, x (B, D) -> [(B, H_i)]."""
        states, h = [], x
        for layer in self.up:
            h = torch.relu(layer(rms_normalize(h)))
            states.append(h)
        return states

    def total_inputs(self, x: Tensor, top: Tensor, states: list[Tensor]) -> list[Tensor]:
        """Every layer's total input ``z_i^t`` from the states at t - 1: [(B, H_i)].

        x (B, D) images, top (B, C) the normalized label rows, states [(B, H_i)].
        """
        normed = [rms_normalize(x), *(rms_normalize(s) for s in states), top]
        return [
            up(normed[i]) + down(normed[i + 2])
            for i, (up, down) in enumerate(zip(self.up, self.down, strict=True))
        ]

    def update(self, x: Tensor, top: Tensor, states: list[Tensor]) -> list[Tensor]:
        """One synchronous iteration: the states at t from those at t - 1, [(B, H_i)]."""
        d = self.config.damping
        zs = self.total_inputs(x, top, states)
        return [d * s + (1 - d) * torch.relu(z) for s, z in zip(states, zs, strict=True)]

    def unroll(
        self, x: Tensor, labels: Tensor, iterations: int | None = None
    ) -> list[list[Tensor]]:
        """States of every layer at t = 0..T for images x (B, D) with labels (B,)."""
        t_max = self.config.iterations if iterations is None else iterations
        top = self.label_input(labels, x.dtype)
        states = [self.bottom_up(x)]
        for _ in range(t_max):
            states.append(self.update(x, top, states[-1]))
        return states

    def forward(self, x: Tensor, labels: Tensor, iterations: int | None = None) -> RecurrentOutput:
        """Final states and goodness (B, T, L) of iterations 1..T for images with labels."""
        states = self.unroll(x, labels, iterations)
        kind = self.config.goodness
        g = torch.stack(
            [
                torch.stack([goodness(s, kind) for s in layer_states], 1)
                for layer_states in states[1:]
            ],
            1,
        )
        return RecurrentOutput(states[-1], g)

    # -- inference, batched over labels -------------------------------------------------------
    @torch.no_grad()
    def label_goodness(self, x: Tensor, iterations: int | None = None) -> Tensor:
        """Goodness of every layer at every iteration for every label: x (B, D) -> (B, C, T, L).

        All C labels in one batch of C*B rows (label-major). The bottom-up start and the first
        layer's product with the image are label-independent, so they are computed once for
        the B images; the label enters as the top layer's column of ``down[L-1]``.
        """
        c, d = self.config.num_classes, self.config.damping
        t_max = self.config.iterations if iterations is None else iterations
        b, n_layers, kind = x.shape[0], self.num_layers, self.config.goodness
        start = self.bottom_up(x)  # [(B, H_i)]
        u0 = self.up[0](rms_normalize(x))  # (B, H_0): layer 0's bottom-up input, every t
        labels = torch.arange(c, device=x.device)
        top_in = self.down[-1](self.label_input(labels, x.dtype))  # (C, H_top)
        states = [s.repeat(c, 1) for s in start]  # (C*B, H_i)
        out = x.new_empty(t_max, n_layers, c * b)
        for t in range(t_max):
            normed = [rms_normalize(s) for s in states]
            new = []
            for i in range(n_layers):
                if i == 0:
                    z = u0.repeat(c, 1)
                else:
                    z = self.up[i](normed[i - 1])
                if i == n_layers - 1:
                    z = (z.view(c, b, -1) + top_in.unsqueeze(1)).view(c * b, -1)
                else:
                    z = z + self.down[i](normed[i + 1])
                s = torch.relu_(z).mul_(1 - d).add_(states[i], alpha=d)
                new.append(s)
                out[t, i] = goodness(s, kind)
            states = new
        return out.view(t_max, n_layers, c, b).permute(3, 2, 0, 1)  # (B, C, T, L)

    def scores(
        self,
        g: Tensor,
        window: tuple[int, int] | None = None,
        layers: range | None = None,
    ) -> Tensor:
        """Label scores from :meth:`label_goodness` output (B, C, T, L) -> (B, C).

        The sum, over the iterations of ``window`` (1-based, inclusive; default the configured
        scoring window) and the ``layers`` (default ``score_from..``), of each layer's goodness
        logit; for ``minssq`` the logit is negated, so the argmax is always the prediction.
        """
        cfg = self.config
        lo, hi = cfg.score_window if window is None else window
        layers = range(cfg.score_from, self.num_layers) if layers is None else layers
        if hi > g.shape[2]:
            raise ValueError(f"scoring window {lo}..{hi} needs {hi} iterations, got {g.shape[2]}")
        logit = positive_logit(g[:, :, lo - 1 : hi][..., list(layers)], 0.0, cfg.goodness)
        return logit.sum((2, 3))

    @torch.no_grad()
    def label_scores(self, x: Tensor) -> Tensor:
        """Summed goodness logit of every candidate label in the scoring window: (B, C)."""
        return self.scores(self.label_goodness(x, self.config.score_window[1]))

    @torch.no_grad()
    def head_logits(self, x: Tensor) -> Tensor:
        """Softmax-head logits from the bottom-up pass: x (B, D) -> (B, C)."""
        feats = [rms_normalize(s) for s in self.bottom_up(x)[self.config.head_from :]]
        return self.head(torch.cat(feats, 1))

    @torch.no_grad()
    def predict(self, x: Tensor, mode: str = "goodness") -> Tensor:
        """Predicted labels (B,) by ``goodness`` (recurrent scoring) or the ``softmax`` head."""
        if mode == "goodness":
            return self.label_scores(x).argmax(1)
        if mode == "softmax":
            return self.head_logits(x).argmax(1)
        raise ValueError(f"unknown inference mode {mode!r}; choose goodness or softmax")
