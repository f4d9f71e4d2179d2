"""Negative sources: where the negative phase gets its data.

Forward-Forward builds its negatives outside the model (a wrong label on a real image, or a
hybrid of two images); a Boltzmann machine draws them from the model by Gibbs sampling (see
``fflab.boltzmann``). Every sampler here takes its random generator explicitly.

A negative source is a small class registered by name with :func:`register`; the FF trainer
looks it up in :data:`NEGATIVE_SOURCES` and calls it once per minibatch:

``source.draw(x, y, generator, probs=None) -> NegativeBatch``

with the positive images ``x`` (B, D), their labels ``y`` (B,), the run's generator and, for
sources that ask for them (``needs_probs``), the softmax head's class probabilities (B, C) from
the neutral-label pass. A source that only changes the label returns the positive image tensor
itself as ``x`` (the trainer then shares the image's first-layer product between the phases);
one that makes new images returns them with ``y = None``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

NEGATIVE_SOURCES: dict[str, type[NegativeSource]] = {}


@dataclass(frozen=True)
class NegativeBatch:
    """The negative phase's data: images (B, D) and labels (B,) or None (unlabelled)."""

    x: Tensor
    y: Tensor | None


class NegativeSource:
    """Base of the negative sources. ``labelled``: whether it makes labelled negatives for a
    supervised net (True) or images for an unsupervised one (False)."""

    name: ClassVar[str]
    labelled: ClassVar[bool]
    needs_probs: ClassVar[bool] = False

    def draw(
        self, x: Tensor, y: Tensor, generator: torch.Generator, probs: Tensor | None = None
    ) -> NegativeBatch:
        raise NotImplementedError


def register(cls: type[NegativeSource]) -> type[NegativeSource]:
    """Class decorator: make a negative source available by its ``name``."""
    NEGATIVE_SOURCES[cls.name] = cls
    return cls


def make_source(name: str, **options) -> NegativeSource:
    """The registered source ``name`` built with ``options`` (its constructor's arguments)."""
    if name not in NEGATIVE_SOURCES:
        known = ", ".join(sorted(NEGATIVE_SOURCES))
        raise ValueError(f"unknown negative source {name!r}; choose one of {known}")
    return NEGATIVE_SOURCES[name](**options)


# -- wrong labels (supervised FF) ---------------------------------------------------------------
def random_wrong_labels(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """Uniformly random labels that never equal the true one: (B,) -> (B,).

    Adds an offset drawn from 1..C-1 modulo C, which is uniform over the C-1 wrong classes.
    """
    offset = torch.randint(
        1, num_classes, labels.shape, generator=generator, device=generator.device
    ).to(labels.device)
    return (labels + offset) % num_classes


def hard_wrong_labels(
    labels: Tensor, probs: Tensor, generator: torch.Generator, floor: float = 1e-6
) -> Tensor:
    """Wrong labels drawn in proportion to a classifier's probabilities: (B,), (B, C) -> (B,).

    The true class gets probability 0 and the others are renormalized, so label ``c != y`` is
    drawn with probability ``p_c / sum_{k != y} p_k``. A small ``floor`` keeps every wrong
    class reachable when the classifier is (numerically) certain. Non-finite probabilities
    (a diverging head) count as 1, so a diverging run reaches the run loop's divergence check
    instead of failing here.
    """
    w = torch.nan_to_num(probs.float(), nan=1.0, posinf=1.0, neginf=0.0).clamp_min_(floor)
    w.scatter_(1, labels.unsqueeze(1), 0.0)
    return torch.multinomial(w, 1, generator=generator).squeeze(1)


@register
class RandomLabels(NegativeSource):
    """The image with a uniformly random wrong label."""

    name, labelled = "random", True

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def draw(self, x, y, generator, probs=None) -> NegativeBatch:
        return NegativeBatch(x, random_wrong_labels(y, self.num_classes, generator))


@register
class HardLabels(NegativeSource):
    """The image with a wrong label drawn in proportion to the softmax head's probabilities
    (Hinton's code): the labels the net currently confuses are the ones it learns from."""

    name, labelled, needs_probs = "hard", True, True

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def draw(self, x, y, generator, probs=None) -> NegativeBatch:
        if probs is None:
            raise ValueError("hard negatives need the softmax head's probabilities")
        return NegativeBatch(x, hard_wrong_labels(y, probs, generator).to(y.device))


# -- hybrid images (unsupervised FF) ------------------------------------------------------------
def blur_operator(size: int, blurs: int, dtype=torch.float32, device=None) -> Tensor:
    """The matrix (size, size) of ``blurs`` passes of [1/4, 1/2, 1/4] along one axis.

    Each pass replicates the edge pixels beyond the border, so row ``i`` of one pass has
    weights 1/4, 1/2, 1/4 at ``i - 1, i, i + 1`` clamped to ``0..size - 1``. The blur is
    linear, so ``blurs`` passes are the ``blurs``-th power of that matrix (built in float64,
    once per size and count).
    """
    return _blur_power(size, blurs).to(dtype=dtype, device=device, copy=True)


@functools.lru_cache(maxsize=16)
def _blur_power(size: int, blurs: int) -> Tensor:
    one = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for j, wt in ((i - 1, 0.25), (i, 0.5), (i + 1, 0.25)):
            one[i, min(max(j, 0), size - 1)] += wt
    return torch.linalg.matrix_power(one, blurs)


def blur_mask(shape: tuple[int, int, int], generator: torch.Generator, blurs: int = 6) -> Tensor:
    """Hybrid-image masks (N, H, W): random bits blurred ``blurs`` times, thresholded at 0.5.

    The blur is the paper's [1/4, 1/2, 1/4] filter applied horizontally and vertically (edge
    pixels replicated beyond the border), giving large, irregular regions of ones and zeros.
    With 6 blurs the correlation between mask pixels falls from about 0.75 for neighbours to
    0.3 at 3 pixels and to nothing beyond about 8 (regions of a few pixels, the width of a
    pen stroke); with no blur the pixels are independent.

    All passes are applied at once as ``A_h M A_w'`` with the :func:`blur_operator` matrices
    (two small matrix products instead of ``2 * blurs`` padded convolutions); the tests hold
    it equal to the passes applied one by one.
    """
    n, h, w = shape
    m = torch.randint(0, 2, (n, h, w), generator=generator, device=generator.device).float()
    if blurs:
        a_h = blur_operator(h, blurs, m.dtype, m.device)
        a_w = blur_operator(w, blurs, m.dtype, m.device)
        m = a_h @ m @ a_w.T  # (N, H, W)
    return (m > 0.5).float()


def partners(y: Tensor | None, generator: torch.Generator, different_class: bool) -> Tensor:
    """For each of B images, the index of another image of the batch: (B,) -> (B,).

    Uniform over the other images, or over those of another class when ``different_class``
    (an image whose class fills the whole batch falls back to any other image).
    """
    b = y.shape[0]
    if b == 1:
        return torch.zeros(1, dtype=torch.long, device=y.device)
    dev = generator.device
    w = 1.0 - torch.eye(b, device=dev)  # (B, B): never the image itself
    if different_class:
        yy = y.to(dev)
        other = (yy.unsqueeze(0) != yy.unsqueeze(1)).float()  # (B, B)
        w = torch.where(other.sum(1, keepdim=True) > 0, other, w)
    return torch.multinomial(w, 1, generator=generator).squeeze(1).to(y.device)


def hybrid_images(
    x: Tensor,
    image_shape: tuple[int, int],
    generator: torch.Generator,
    blurs: int = 6,
    y: Tensor | None = None,
    different_class: bool = False,
) -> Tensor:
    """Unsupervised FF negatives: x (B, D) -> (B, D), ``x_a * m + x_b * (1 - m)``.

    ``x_a`` is each image and ``x_b`` another image of the batch (of another class when
    ``different_class``; labels ``y`` (B,) are then needed), ``m`` a :func:`blur_mask`. The
    result has the short-range statistics of real images (each region is a piece of a real
    image) but shapes that belong to no digit.
    """
    b = x.shape[0]
    if different_class and y is None:
        raise ValueError("different_class needs the labels y")
    ref = y if y is not None else torch.zeros(b, dtype=torch.long, device=x.device)
    other = x.index_select(0, partners(ref, generator, different_class).to(x.device))
    m = blur_mask((b, *image_shape), generator, blurs).reshape(b, -1).to(x.device) > 0.5
    return torch.where(m, x, other)  # x * m + other * (1 - m), without rounding


@register
class HybridImages(NegativeSource):
    """Hybrids of two real images under a blurred random mask (the paper's unsupervised
    negatives). ``image_shape`` (H, W) of the flattened images; ``blurs`` passes of the
    [1/4, 1/2, 1/4] filter; ``different_class``: the second image is of another class."""

    name, labelled = "hybrid", False

    def __init__(
        self, image_shape: tuple[int, int], blurs: int = 6, different_class: bool = False
    ) -> None:
        if blurs < 0:
            raise ValueError(f"blurs must be >= 0, got {blurs}")
        self.image_shape, self.blurs, self.different_class = image_shape, blurs, different_class

    def draw(self, x, y, generator, probs=None) -> NegativeBatch:
        hyb = hybrid_images(x, self.image_shape, generator, self.blurs, y, self.different_class)
        return NegativeBatch(hyb, None)


# -- other unlabelled negatives (the negatives study) -------------------------------------------
def permuted_pixels(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image's pixels under its own uniformly random permutation: x (B, D) -> (B, D).

    Row ``i`` of the result is ``x[i, perm_i]`` with ``perm_i`` drawn afresh for every image
    (the ranks of D uniform draws, a uniform permutation). An image keeps its pixel values
    (its histogram, its amount of ink and its norm) and loses every spatial relation.
    """
    b, d = x.shape
    perm = torch.rand((b, d), generator=generator, device=generator.device).argsort(1)
    return x.gather(1, perm.to(x.device))


def other_images(
    x: Tensor,
    generator: torch.Generator,
    y: Tensor | None = None,
    different_class: bool = False,
) -> Tensor:
    """For each image, another real image of the batch, unchanged: x (B, D) -> (B, D).

    The partner is drawn as in :func:`hybrid_images` (uniform over the other images, or over
    those of another class when ``different_class``; labels ``y`` (B,) are then needed).
    """
    if different_class and y is None:
        raise ValueError("different_class needs the labels y")
    ref = y if y is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return x.index_select(0, partners(ref, generator, different_class).to(x.device))


@register
class PermutedImages(NegativeSource):
    """Real images with their pixels shuffled, a fresh permutation per image.

    Fresh per image rather than one fixed per run: a fixed permutation ``P`` makes the
    negatives one more structured data set (``P x`` has the digits' correlations, moved to
    other pixels), whereas a fresh one leaves no spatial structure at all, only each image's
    pixel values; it also needs no state beyond the generator, so a resumed run draws the same
    negatives. The negatives have the positives' norms but not their per-pixel means (ink
    spread evenly over the frame), so even a linear feature tells them apart: an easy
    negative. ``image_shape`` and ``blurs`` are accepted because the trainer passes them to
    every unlabelled source; they are not used.
    """

    name, labelled = "permuted", False

    def __init__(
        self, image_shape: tuple[int, int] = (), blurs: int = 0, different_class: bool = False
    ) -> None:
        if different_class:
            raise ValueError("permuted negatives have no second image (different_class)")
        self.image_shape = image_shape

    def draw(self, x, y, generator, probs=None) -> NegativeBatch:
        return NegativeBatch(permuted_pixels(x, generator), None)


@register
class UnmaskedImages(NegativeSource):
    """Another real image of the batch as it is: a hybrid whose mask is all zeros.

    Degenerate on purpose: with ``different_class`` False the negatives come from the same
    distribution as the positives, so no feature of an image can tell the two phases apart.
    The expected FF loss of an image is then ``softplus(-l) + softplus(l)`` with ``l = G -
    theta``, least at ``G = theta``: the loss asks every real image for goodness theta and
    nothing else (a scale, not a feature). With ``different_class`` (uses labels) the pair
    differs in class, but each row alone is still a real image.
    ``image_shape`` and ``blurs`` are accepted as for every unlabelled source; not used.
    """

    name, labelled = "unmasked", False

    def __init__(
        self, image_shape: tuple[int, int] = (), blurs: int = 0, different_class: bool = False
    ) -> None:
        self.image_shape, self.different_class = image_shape, different_class

    def draw(self, x, y, generator, probs=None) -> NegativeBatch:
        return NegativeBatch(other_images(x, generator, y, self.different_class), None)
