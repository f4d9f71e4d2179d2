"""Peak memory of one training step: measured, and counted by hand from the step's tensors.

**Measured.** On CPU, :func:`cpu_peak_bytes` runs the step under ``torch.profiler`` with
``profile_memory=True``: torch's CPU allocator reports every allocation and free (signed byte
counts, in order) to the profiler, and the running sum of those events is the memory that torch
tensors hold; its maximum over the step, above the level at the start, is the step's peak.
(torch 2.13 keeps no CPU allocator statistics of its own, and ``tracemalloc`` does not see
tensor storage, which is allocated outside Python's allocator.) Buffers a BLAS library
allocates for itself are not torch tensors and are not seen. On CUDA,
:func:`cuda_peak_bytes` reads ``torch.cuda.max_memory_allocated`` above the level at the start.

**Counted.** :func:`ff_step_bytes` and :func:`bp_step_bytes` replay, tensor by tensor, what
the FF step (:class:`fflab.ff.train.FFTrainer`, either schedule, supervised or unsupervised)
and the backprop twin's hand-derived step (:func:`fflab.backprop.hand_backward_`) allocate and
free, for dense layers, and return the largest total alive. Only tensors with a row per sample
and a column per unit, pixel or class are counted (``(N, H)``, ``(N, D)``, ``(N, C)``);
vectors of one value per row or per unit are left out, which puts the count a little under
the measurement on small nets. Parameters, optimizer state and the batch itself exist before
the step and are not part of it (:func:`state_bytes` counts them).

Shapes: ``B`` batch, ``D`` input width (label included), ``Dx`` image pixels, ``C`` classes,
``H_l`` units of hidden layer ``l``, ``L`` hidden layers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import torch


# -- measured ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start and stop lines)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Run ``fn()`` once; the most bytes that torch's CPU allocator held at any moment during
    it, above what it held at the start (the running sum of the profiler's memory events)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    events = [
        (e.start_ns(), k, e.nbytes())
        for k, e in enumerate(p.profiler.kineto_results.events())
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    live = peak = 0
    for _, _, n in sorted(events):
        live += n
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Run ``fn()`` once on a CUDA device; the peak of ``torch.cuda.max_memory_allocated``
    above the bytes allocated at the start."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The step's peak bytes above its start: :func:`cuda_peak_bytes` on CUDA, else
    :func:`cpu_peak_bytes`."""
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    if device.type != "cpu":
        raise ValueError(f"memory can be measured on cpu or cuda, not {device.type}")
    return cpu_peak_bytes(fn)


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the parameters (and buffers) and of the optimizer state: what a step needs
    before it starts, the same for either schedule."""
    params = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    opt = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    return {"parameters": params, "optimizer": opt}


# -- counted -------------------------------------------------------------------------------------
class Tape:
    """A replay of a step's allocations: ``alloc(name, bytes)``, ``free(name)``; ``peak`` is the
    largest total alive and, with ``track``, ``at_peak`` the names alive then."""

    def __init__(self, track: bool = True) -> None:
        self.live: dict[str, int] = {}
        self.total = self.peak = 0
        self.track = track
        self.at_peak: list[str] = []

    def alloc(self, name: str, nbytes: int) -> None:
        if name in self.live:
            raise ValueError(f"tensor {name!r} is already alive")
        self.live[name] = nbytes
        self.total += nbytes
        if self.total > self.peak:
            self.peak = self.total
            if self.track:
                self.at_peak = list(self.live)

    def free(self, *names: str) -> None:
        for name in names:
            self.total -= self.live.pop(name)

    def moment(self, name: str, nbytes: int) -> None:
        """A temporary that lives only while it is made (allocated and freed at once)."""
        self.alloc(name, nbytes)
        self.free(name)


def _check(batch: int, hidden: Sequence[int], in_features: int, itemsize: int) -> None:
    if batch < 1 or in_features < 1 or itemsize < 1 or not hidden or min(hidden) < 1:
        raise ValueError("batch, in_features, itemsize and every hidden width must be >= 1")


def ff_step_bytes(
    batch: int,
    in_features: int,
    hidden: Sequence[int],
    num_classes: int = 10,
    *,
    schedule: str = "forward_first",
    label_mode: str = "overlay",
    head_from: int = 1,
    itemsize: int = 4,
    tape: Tape | None = None,
) -> int:
    """Peak bytes alive during one FF step of dense layers (:class:`fflab.ff.train.FFTrainer`).

    ``in_features`` is the image width D (the model's ``in_features``); ``label_mode`` overlay
    or concat is the supervised step, ``none`` the unsupervised one with hybrid negatives;
    ``schedule`` forward_first or layerwise. N = 2B rows (positive over negative) go through
    the net in the positive and negative phases, B in the supervised step's neutral phase.
    """
    _check(batch, hidden, in_features, itemsize)
    if schedule not in ("forward_first", "layerwise"):
        raise ValueError(f"schedule must be forward_first or layerwise, got {schedule!r}")
    if label_mode not in ("overlay", "concat", "none"):
        raise ValueError(f"label_mode must be overlay, concat or none, got {label_mode!r}")
    t = Tape(track=False) if tape is None else tape
    b, n, s, hs, c = batch, 2 * batch, itemsize, list(hidden), num_classes
    n_layers, lw = len(hs), schedule == "layerwise"
    if label_mode == "none":
        _ff_unsupervised(t, b, n, s, in_features, hs, lw)
        return t.peak
    if not 0 <= head_from < n_layers:
        raise ValueError(f"head_from must be in 0..{n_layers - 1}, got {head_from}")
    dx = in_features - c if label_mode == "overlay" else in_features
    h0, feats = hs[0], sum(hs[head_from:])
    # the image part of layer 0, shared by every pass (B, H_0); the image's squares (B, Dx)
    t.alloc("a_img", b * h0 * s)
    t.moment("x^2", b * dx * s)
    # neutral phase: z0 = scale * (a_img + label column), then the pass and the head features
    t.alloc("a_img+label", b * h0 * s)
    t.alloc("z0_neutral", b * h0 * s)
    t.free("a_img+label")
    if lw:
        t.alloc("features", b * feats * s)
        a = "z0_neutral"
        for i in range(n_layers):
            t.alloc(f"h{i + 1}_neutral", b * hs[i] * s)  # normalized activities of layer i
            t.free(a)
            if i + 1 < n_layers:
                t.alloc(f"a{i + 1}_neutral", b * hs[i + 1] * s)
                a = f"a{i + 1}_neutral"
            t.free(f"h{i + 1}_neutral")
    else:
        for i in range(1, n_layers + 1):  # inputs[i] = normalized a_{i-1}, then a_i
            t.alloc(f"h{i}_neutral", b * hs[i - 1] * s)
            if i < n_layers:
                t.alloc(f"a{i}_neutral", b * hs[i] * s)
        t.alloc("features", b * feats * s)  # torch.cat of inputs[head_from + 1:]
        t.free(*(f"a{i}_neutral" for i in range(1, n_layers)))
        t.free(*(f"h{i}_neutral" for i in range(1, n_layers + 1)))
        t.free("z0_neutral")
    t.alloc("head_probs", b * c * s)
    t.free("features", "head_probs")
    # positive and negative phases, stacked: the scaled one-hot labels (N, C), then z0 (N, H_0)
    t.alloc("label_in", n * c * s)
    if lw:
        t.alloc("ssq_table", n_layers * n * s)  # every layer's sums of squares (L, N)
    t.alloc("z_img", b * h0 * s)
    t.alloc("z_img.repeat", n * h0 * s)
    t.alloc("label_columns", n * h0 * s)
    t.alloc("a0", n * h0 * s)
    t.free("z_img", "z_img.repeat", "label_columns")
    _stacked_layers(t, b, n, s, hs, lw, image_grad=True)
    return t.peak


def _stacked_layers(t: Tape, b, n, s, hs: list[int], lw: bool, image_grad: bool) -> None:
    """The positive and negative phases from ``a0`` (N, H_0) on: every layer's activities,
    inputs and gradients on ``t``, by schedule. Layer 0's input, if it has one, is ``h0``;
    ``image_grad``: layer 0's image columns take the sum of dz's positive and negative rows."""
    n_layers = len(hs)

    def grad(i: int) -> None:
        t.alloc(f"dz{i}", n * hs[i] * s)
        if i == 0 and image_grad:
            t.moment("dz0_pos+neg", b * hs[0] * s)  # the image columns' shared product input
        t.free(f"dz{i}")

    if lw:
        for i in range(n_layers):
            if i > 0:
                t.alloc(f"h{i}", n * hs[i - 1] * s)
                t.free(f"a{i - 1}")
                t.alloc(f"a{i}", n * hs[i] * s)
            t.moment(f"a{i}>0", b * hs[i])
            t.alloc("coef_table", n_layers * n * s)  # dL/dz = coef * a, every layer's (L, N)
            grad(i)
            t.free("coef_table")
            if i > 0 or "h0" in t.live:
                t.free(f"h{i}")
        return
    for i in range(1, n_layers):
        t.alloc(f"h{i}", n * hs[i - 1] * s)
        t.alloc(f"a{i}", n * hs[i] * s)
    t.alloc("ssq", n_layers * n * s)  # every layer's sums of squares (L vectors of N)
    for i in range(n_layers):
        t.moment(f"a{i}>0", b * hs[i])
    t.alloc("coef", n_layers * n * s)
    for i in range(n_layers):
        grad(i)


def _ff_unsupervised(t: Tape, b: int, n: int, s: int, d: int, hs: list[int], lw: bool) -> None:
    """The unsupervised step on ``t``: hybrid negatives, then the stacked rows (N, D)."""
    # the hybrid negatives (fflab.negatives.hybrid_images): the partner images, the mask's
    # random bits (int64) and their float32 copy, then the hybrids
    t.alloc("partners", b * d * s)
    t.alloc("mask_bits", b * d * 8)
    t.moment("mask_float", b * d * 4)
    t.free("mask_bits")
    t.alloc("hybrids", b * d * s)
    t.free("partners")
    if lw:
        t.alloc("ssq_table", len(hs) * n * s)
    t.alloc("h0_cat", n * d * s)
    t.alloc("h0", n * d * s)
    t.free("h0_cat")
    t.alloc("a0", n * hs[0] * s)
    _stacked_layers(t, b, n, s, hs, lw, image_grad=False)


def bp_step_bytes(
    batch: int,
    in_features: int,
    hidden: Sequence[int],
    num_classes: int = 10,
    *,
    neutral_label: bool = True,
    itemsize: int = 4,
    tape: Tape | None = None,
) -> int:
    """Peak bytes alive during one step of the backprop twin (:func:`fflab.backprop.
    hand_backward_`, dense layers, softmax output).

    The forward pass keeps every module's normalized input h_l (B, in_l) for the backward
    pass; the backward pass holds dz (B, out_l), dL/dh (B, in_l) and the RMS backward's
    temporary (B, in_l) on top. ``neutral_label``: the input is a copy of the image with the
    neutral label written over it (the twin of an overlay net); otherwise the image itself.
    """
    _check(batch, hidden, in_features, itemsize)
    t = Tape(track=False) if tape is None else tape
    b, s, c = batch, itemsize, num_classes
    widths = [in_features, *hidden, c]  # module l maps widths[l] -> widths[l + 1]
    u = None
    if neutral_label:
        t.alloc("x_neutral", b * in_features * s)
        u = "x_neutral"
    for i in range(len(widths) - 1):
        t.moment(f"u{i}^2", b * widths[i] * s)
        t.alloc(f"h{i}", b * widths[i] * s)
        t.alloc(f"u{i + 1}", b * widths[i + 1] * s)
        if u is not None:
            t.free(u)
        u = f"u{i + 1}"
    # backward: dz of the output is the softmax (computed in place of u_{L+1})
    dz, dh = u, None
    for i in reversed(range(len(widths) - 1)):
        if i == 0:
            break
        t.alloc(f"dh{i}", b * widths[i] * s)
        if dh is not None:
            t.free(dh)
        dh = f"dh{i}"
        t.moment(f"dh{i}*h{i}", b * widths[i] * s)
        t.alloc(f"dz{i - 1}", b * widths[i] * s)
        t.moment(f"h{i}<=0", b * widths[i])
        t.free(dz)
        dz = f"dz{i - 1}"
    return t.peak
