"""Negative sources: how the negative phase gets its data.

Forward-Forward builds negatives outside the model (a wrong label on a real image, or a hybrid
of two images); a Boltzmann machine draws them from the model by Gibbs sampling (see
``fflab.boltzmann``). Every sampler here takes its random generator explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEGATIVE_SOURCES = ("random", "hard")


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
    class reachable when the classifier is (numerically) certain.
    """
    w = probs.float().clamp_min(floor)  # a new tensor: probs is left as it is
    w.scatter_(1, labels.unsqueeze(1), 0.0)
    return torch.multinomial(w, 1, generator=generator).squeeze(1)


def blur_mask(shape: tuple[int, int, int], generator: torch.Generator, blurs: int = 6) -> Tensor:
    """Hybrid-image masks (N, H, W): random bits blurred ``blurs`` times, thresholded at 0.5.

    The blur is the paper's [1/4, 1/2, 1/4] filter applied horizontally and vertically, giving
    large, irregular regions of ones and zeros.
    """
    n, h, w = shape
    m = torch.randint(0, 2, (n, 1, h, w), generator=generator, device=generator.device).float()
    k = torch.tensor([0.25, 0.5, 0.25], device=m.device)
    for _ in range(blurs):
        m = F.conv2d(F.pad(m, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3))
        m = F.conv2d(F.pad(m, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1))
    return (m.squeeze(1) > 0.5).float()


def hybrid_images(
    x: Tensor, image_shape: tuple[int, int], generator: torch.Generator, blurs: int = 6
) -> Tensor:
    """Unsupervised FF negatives: x (B, D) -> (B, D), ``x_a * m + x_b * (1 - m)``.

    ``x_a`` is each image and ``x_b`` the image a random non-zero number of places further
    along the batch (so never the image itself when B > 1).
    """
    b = x.shape[0]
    shift = torch.randint(1, max(b, 2), (1,), generator=generator, device=generator.device)
    other = torch.roll(x, int(shift), dims=0)
    m = blur_mask((b, *image_shape), generator, blurs).reshape(b, -1).to(x.device, x.dtype)
    return x * m + other * (1 - m)
