"""Classification RBM: an RBM over an image and its one-hot label (Larochelle & Bengio 2008).

Energy of a joint state, v in {0,1}^D (pixel values in [0, 1] are read as probabilities),
y in {0..C-1} written as the one-hot e_y, h in {0,1}^H::

    E(v, y, h) = -b.v - d_y - c.h - h'Wv - h'U e_y
    W: (H, D), U: (H, C), b: (D,), c: (H,), d: (C,)

Summing the hiddens out gives the free energy of each candidate label,

    F(v, y) = -b.v - d_y - sum_j softplus(c_j + U_jy + (Wv)_j),

and the class posterior is exact, a softmax over C numbers: ``p(y | v) = softmax_y(-F(v, y))``.
That is FF's goodness scoring with E = -G: score every candidate label with the same net,
predict the best. The conditionals factorize as in any RBM::

    p(h_j = 1 | v, y) = sigmoid(c_j + U_jy + (Wv)_j)
    p(v_i = 1 | h) = sigmoid(b_i + (W'h)_i)        p(y | h) = softmax(d + U'h)

Three training objectives, each a loss per example averaged over a batch:

- **discriminative**: ``-log p(y | v)``; its gradient is exact and in closed form
  (:func:`discriminative_gradient`): no sampling, one up-pass per candidate label (shared
  matmul) and one weight-gradient matmul.
- **generative**: ``-log p(v, y)``; its gradient is estimated by CD-k (:func:`cd_gradient`):
  block Gibbs sampling of v and y given h, h given (v, y).
- **hybrid**: ``-log p(y | v) - alpha log p(v, y)`` (:func:`hybrid_gradient`).

Features without the label: ``p(h_j = 1 | v) = sum_y p(y | v) p(h_j = 1 | v, y)``, the
hidden units' probabilities with the label summed out under the model's own posterior
(:func:`marginal_hidden_probs`); exact, C terms.

Every gradient here is the gradient of a loss to *minimize* (descent), keyed like the
parameters. Shapes: ``B`` examples, ``D`` visible units, ``H`` hidden, ``C`` classes; labels
are int64 class indices (B,).

Reference: H. Larochelle and Y. Bengio, "Classification using discriminative restricted
Boltzmann machines", ICML 2008.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    as_input,
    bernoulli,
    check_batch,
    check_generator,
    check_unit_interval,
    check_units,
)
from .rbm import visible_probs

__all__ = [
    "ClassRBM",
    "ClassCDResult",
    "hidden_input",
    "label_inputs",
    "free_energy",
    "label_free_energy",
    "class_log_probs",
    "hidden_probs",
    "marginal_hidden_probs",
    "label_probs",
    "sample_label",
    "sample_hidden",
    "gibbs_step",
    "discriminative_gradient",
    "cd_gradient",
    "hybrid_gradient",
]

PARAMS = ("W", "U", "b", "c", "d")


def hidden_input(v: Tensor, W: Tensor, c: Tensor) -> Tensor:
    """The label-free part of every hidden unit's input, ``c + Wv``.  v: (B, D) -> (B, H)."""
    return torch.addmm(c, v, W.T)


def label_inputs(v: Tensor, W: Tensor, U: Tensor, c: Tensor) -> Tensor:
    """Every hidden unit's input under every candidate label, ``o[:, k, j] = c_j + U_jk +
    (Wv)_j``: the (B, H) product with W once, broadcast against the label columns of U.

    v: (B, D) -> (B, C, H) (hidden units innermost, so sums over them are contiguous).
    """
    return hidden_input(v, W, c).unsqueeze(1) + U.T


def free_energy(v: Tensor, W: Tensor, U: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """F(v, y) for every candidate label at once (no loop over labels).  v: (B, D) -> (B, C)."""
    o = label_inputs(v, W, U, c)  # (B, C, H)
    return -(v @ b).unsqueeze(-1) - d - F.softplus(o).sum(2)  # (B, C)


def label_free_energy(
    v: Tensor, y: Tensor, W: Tensor, U: Tensor, b: Tensor, c: Tensor, d: Tensor
) -> Tensor:
    """F(v, y) for one given label per row.  v: (B, D), y: (B,) -> (B,)."""
    o = hidden_input(v, W, c) + U.T[y]  # (B, H)
    return -(v @ b) - d[y] - F.softplus(o).sum(1)


def class_log_probs(v: Tensor, W: Tensor, U: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """log p(y | v) = log_softmax_y(-F(v, y)).  v: (B, D) -> (B, C)."""
    return torch.log_softmax(-free_energy(v, W, U, b, c, d), dim=1)


def hidden_probs(v: Tensor, y: Tensor, W: Tensor, U: Tensor, c: Tensor) -> Tensor:
    """p(h_j = 1 | v, y).  v: (B, D), y: (B,) -> (B, H)."""
    return torch.sigmoid(hidden_input(v, W, c) + U.T[y])


def marginal_hidden_probs(
    v: Tensor, W: Tensor, U: Tensor, b: Tensor, c: Tensor, d: Tensor
) -> Tensor:
    """p(h_j = 1 | v) with the label summed out: ``sum_y p(y | v) sigmoid(c_j + U_jy +
    (Wv)_j)``.  v: (B, D) -> (B, H)."""
    o = label_inputs(v, W, U, c)  # (B, C, H)
    p_y = torch.softmax((v @ b).unsqueeze(-1) + d + F.softplus(o).sum(2), dim=1)  # (B, C)
    return torch.bmm(p_y.unsqueeze(1), torch.sigmoid(o)).squeeze(1)  # (B, H)


def label_probs(h: Tensor, U: Tensor, d: Tensor) -> Tensor:
    """p(y | h) = softmax(d + U'h).  h: (B, H) -> (B, C)."""
    return torch.softmax(torch.addmm(d, h, U), dim=1)


def sample_label(
    h: Tensor, U: Tensor, d: Tensor, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw y ~ p(y | h) by inverting the cumulative distribution at one uniform number per
    row.  h: (B, H) -> (labels (B,) int64, probabilities (B, C))."""
    p = label_probs(h, U, d)
    u = torch.rand(p.shape[0], 1, generator=generator, dtype=p.dtype, device=p.device)
    y = (p.cumsum(1) < u).sum(1).clamp_(max=p.shape[1] - 1)  # first class whose CDF passes u
    return y, p


def sample_hidden(
    v: Tensor, y: Tensor, W: Tensor, U: Tensor, c: Tensor, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw h ~ p(h | v, y).  -> (sample (B, H), probabilities (B, H))."""
    p = hidden_probs(v, y, W, U, c)
    return bernoulli(p, generator), p


def gibbs_step(
    h: Tensor, W: Tensor, U: Tensor, b: Tensor, c: Tensor, d: Tensor, *, generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One block Gibbs step from hidden states: v ~ p(v | h) and y ~ p(y | h) (independent
    given h), then h' ~ p(h | v, y).

    h: (B, H) -> (v (B, D), y (B,), h' sample (B, H), p(h | v, y) (B, H)).
    """
    v = bernoulli(visible_probs(h, W.T, b), generator)  # fflab's RBM helper: W.T is (D, H)
    y, _ = sample_label(h, U, d, generator=generator)
    h_new, p_h = sample_hidden(v, y, W, U, c, generator=generator)
    return v, y, h_new, p_h


def discriminative_gradient(
    v: Tensor, y: Tensor, W: Tensor, U: Tensor, b: Tensor, c: Tensor, d: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """Exact gradient of the mean of ``-log p(y | v)`` over the batch, in closed form.

    With ``o_jk = c_j + U_jk + (Wv)_j`` and ``s = sigmoid(o)``, ``-F(v, k)`` has gradients
    ``s_jk`` (c_j), ``s_jk [k = k']`` (U_jk'), ``s_jk v_i`` (W_ji), ``[k = k']`` (d_k'), ``v``
    (b), and ``log p(y | v) = -F(v, y) - logsumexp_k -F(v, k)``; so per example

    - d: ``p - e_y``;  b: 0 (b.v is the same for every label);
    - U[:, k]: ``p_k s_k - [k = y] s_y``;  c: ``delta = sum_k p_k s_k - s_y``;
    - W: ``delta v'``.

    v: (B, D), y: (B,). Returns (grads keyed W (H, D), U (H, C), b (D,), c (H,), d (C,);
    log p(k | v) (B, C), which the caller can use to report the loss).
    """
    n = v.shape[0]
    o = label_inputs(v, W, U, c)  # (B, C, H)
    log_p = torch.log_softmax((v @ b).unsqueeze(-1) + d + F.softplus(o).sum(2), dim=1)
    p = log_p.exp()  # (B, C)
    onehot = F.one_hot(y, U.shape[1]).to(p.dtype)  # (B, C)
    coef = torch.sigmoid(o).mul_((p - onehot).unsqueeze(2))  # (B, C, H): p_k s_k - [k = y] s_k
    delta = coef.sum(1)  # (B, H)
    grads = {
        "W": torch.mm(delta.T, v).div_(n),  # (H, D)
        "U": coef.sum(0).T.div_(n),  # (H, C)
        "b": torch.zeros_like(b),
        "c": delta.sum(0).div_(n),  # (H,)
        "d": (p - onehot).sum(0).div_(n),  # (C,)
    }
    return grads, log_p


class ClassCDResult(NamedTuple):
    """A CD-k estimate of the gradient of the mean ``-log p(v, y)``.

    grads: keyed like the parameters, ``-(positive - negative)`` statistics: W (H, D),
        U (H, C), b (D,), c (H,), d (C,).
    v_negative: (B, D) and y_negative: (B,) the chains' visible and label states after k steps.
    h_data_probs: (B, H) p(h | v_data, y_data), the positive phase.
    """

    grads: dict[str, Tensor]
    v_negative: Tensor
    y_negative: Tensor
    h_data_probs: Tensor


def cd_gradient(
    v: Tensor,
    y: Tensor,
    W: Tensor,
    U: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
    *,
    k: int = 1,
    generator: torch.Generator,
) -> ClassCDResult:
    """CD-k estimate of the gradient of the mean of ``-log p(v, y)`` (the generative loss).

    Positive phase: the data (v, e_y) and p(h | v, y). Negative phase: from a hidden sample of
    the data, k block Gibbs steps (:func:`gibbs_step`: v and y given h, h given v and y);
    statistics at the final (v, y) with p(h | v, y) (probabilities, not samples, as
    :func:`fflab.boltzmann.rbm.cd_gradient` does). v: (B, D) in [0, 1], y: (B,).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n, n_classes = v.shape[0], U.shape[1]
    h_pos = hidden_probs(v, y, W, U, c)  # (B, H)
    h = bernoulli(h_pos, generator)
    for _ in range(k):
        v_neg, y_neg, h, h_neg = gibbs_step(h, W, U, b, c, d, generator=generator)
    e_pos = F.one_hot(y, n_classes).to(v.dtype)  # (B, C)
    e_neg = F.one_hot(y_neg, n_classes).to(v.dtype)
    # -(<h v'>_data - <h v'>_model) as one product over the stacked phases
    h_both = torch.cat((h_pos, h_neg)) / n  # (2B, H)
    h_both[:n].neg_()
    grads = {
        "W": torch.mm(h_both.T, torch.cat((v, v_neg))),  # (H, D)
        "U": torch.mm(h_both.T, torch.cat((e_pos, e_neg))),  # (H, C)
        "b": (v_neg - v).mean(0),
        "c": (h_neg - h_pos).mean(0),
        "d": (e_neg - e_pos).mean(0),
    }
    return ClassCDResult(grads, v_neg, y_neg, h_pos)


def hybrid_gradient(
    v: Tensor,
    y: Tensor,
    W: Tensor,
    U: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
    *,
    alpha: float,
    k: int = 1,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], Tensor]:
    """Gradient of the mean of ``-log p(y | v) - alpha log p(v, y)``: the exact
    discriminative gradient plus ``alpha`` times the CD-k estimate of the generative one.

    Returns (grads, log p(k | v) (B, C)) like :func:`discriminative_gradient`.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    grads, log_p = discriminative_gradient(v, y, W, U, b, c, d)
    gen = cd_gradient(v, y, W, U, b, c, d, k=k, generator=generator).grads
    for name, g in gen.items():
        grads[name].add_(g, alpha=alpha)
    return grads, log_p


def check_labels(y, n_rows: int, n_classes: int, name: str = "y") -> Tensor:
    """Class indices as an int64 tensor (n_rows,) with values in [0, n_classes)."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{name} must be integer class labels, got {type(y).__name__}"
            ) from None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class labels, got dtype {y.dtype}")
    if y.shape != (n_rows,):
        raise ValueError(f"{name} must have shape ({n_rows},), got {tuple(y.shape)}")
    if n_rows and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"{name} must be class labels in 0..{n_classes - 1}")
    return y.long()


class ClassRBM(nn.Module):
    """Classification RBM: parameters ``W`` (H, D), ``U`` (H, C), ``b`` (D,), ``c`` (H,),
    ``d`` (C,).

    Initialisation: W and U uniform in ``+-1 / sqrt(max(D, H))``, biases 0 (fflab's choice;
    small enough that every unit starts in the linear range of its sigmoid). ``dtype``:
    float32 or float64. The methods take tensors or numpy arrays (cast to the model's dtype).
    """

    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        num_classes: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.n_visible = check_units(n_visible, "n_visible")
        self.n_hidden = check_units(n_hidden, "n_hidden")
        self.num_classes = check_units(num_classes, "num_classes")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        a = 1.0 / max(n_visible, n_hidden) ** 0.5
        W = torch.empty(n_hidden, n_visible, dtype=dtype).uniform_(-a, a, generator=generator)
        U = torch.empty(n_hidden, num_classes, dtype=dtype).uniform_(-a, a, generator=generator)
        self.W = nn.Parameter(W)
        self.U = nn.Parameter(U)
        self.b = nn.Parameter(torch.zeros(n_visible, dtype=dtype))
        self.c = nn.Parameter(torch.zeros(n_hidden, dtype=dtype))
        self.d = nn.Parameter(torch.zeros(num_classes, dtype=dtype))

    def extra_repr(self) -> str:
        return (
            f"n_visible={self.n_visible}, n_hidden={self.n_hidden}, num_classes={self.num_classes}"
        )

    def params(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(W, U, b, c, d), the arguments of the pure functions."""
        return self.W, self.U, self.b, self.c, self.d

    def _v(self, v, name: str = "v") -> Tensor:
        return check_batch(as_input(v, self.W), self.n_visible, name)

    def _y(self, y, n_rows: int) -> Tensor:
        return check_labels(y, n_rows, self.num_classes).to(self.W.device)

    # -- inference -----------------------------------------------------------------------

    @torch.no_grad()
    def free_energy(self, v) -> Tensor:
        """F(v, y) for every label.  v: (B, D) -> (B, C)."""
        return free_energy(self._v(v), *self.params())

    @torch.no_grad()
    def log_proba(self, v) -> Tensor:
        """log p(y | v).  v: (B, D) -> (B, C)."""
        return class_log_probs(self._v(v), *self.params())

    @torch.no_grad()
    def predict_proba(self, v) -> Tensor:
        """p(y | v).  v: (B, D) -> (B, C)."""
        return self.log_proba(v).exp()

    @torch.no_grad()
    def predict(self, v) -> Tensor:
        """The label of least free energy (the most probable).  v: (B, D) -> (B,) int64."""
        return self.free_energy(v).argmin(1)

    @torch.no_grad()
    def hidden_probs(self, v, y) -> Tensor:
        """p(h = 1 | v, y).  v: (B, D), y: (B,) -> (B, H)."""
        v = self._v(v)
        return hidden_probs(v, self._y(y, v.shape[0]), self.W, self.U, self.c)

    @torch.no_grad()
    def features(self, v) -> Tensor:
        """p(h = 1 | v) with the label summed out (:func:`marginal_hidden_probs`): (B, H)."""
        return marginal_hidden_probs(self._v(v), *self.params())

    # -- learning signals ----------------------------------------------------------------

    @torch.no_grad()
    def discriminative_gradient(self, v, y) -> tuple[dict[str, Tensor], Tensor]:
        """Exact gradient of the mean ``-log p(y | v)`` (:func:`discriminative_gradient`)."""
        v = self._v(v)
        return discriminative_gradient(v, self._y(y, v.shape[0]), *self.params())

    @torch.no_grad()
    def cd_gradient(self, v, y, *, k: int = 1, generator: torch.Generator) -> ClassCDResult:
        """CD-k estimate of the gradient of the mean ``-log p(v, y)`` (:func:`cd_gradient`)."""
        check_generator(generator)
        v = check_unit_interval(self._v(v), "v")
        return cd_gradient(v, self._y(y, v.shape[0]), *self.params(), k=k, generator=generator)

    @torch.no_grad()
    def hybrid_gradient(
        self, v, y, *, alpha: float, k: int = 1, generator: torch.Generator
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Gradient of the mean ``-log p(y | v) - alpha log p(v, y)``
        (:func:`hybrid_gradient`)."""
        check_generator(generator)
        v = check_unit_interval(self._v(v), "v")
        y = self._y(y, v.shape[0])
        return hybrid_gradient(v, y, *self.params(), alpha=alpha, k=k, generator=generator)
