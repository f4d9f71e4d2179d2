"""Bernoulli-Bernoulli restricted Boltzmann machine (RBM).

Energy of a joint state (v, h), v in {0,1}^V, h in {0,1}^H::

    E(v, h) = -b_v.v - b_h.h - v'Wh            W: (V, H), b_v: (V,), b_h: (H,)

With no lateral connections the conditionals factorize,

    p(h_j = 1 | v) = sigmoid(b_h_j + (vW)_j)     p(v_i = 1 | h) = sigmoid(b_v_i + (Wh)_i)

so block Gibbs samples all hiddens at once, then all visibles. Summing the hiddens out
gives the free energy ``F(v) = -b_v.v - sum_j softplus(b_h_j + (vW)_j)``, p(v) = exp(-F)/Z.

The math lives in pure functions of tensors (shapes in the docstrings); :class:`RBM` holds
the parameters and the persistent chains of PCD as registered buffers, so they follow
``.to(device)`` and survive ``state_dict`` round trips. Learning needs no autograd: the
log-likelihood gradient is "positive minus negative phase" statistics, a few matmuls.

References: Hinton, "A Practical Guide to Training Restricted Boltzmann Machines" (2010);
Tieleman, "Training RBMs using approximations to the likelihood gradient" (PCD, 2008).
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
    check_last_dim,
    check_unit_interval,
    check_units,
)

__all__ = [
    "RBM",
    "CDResult",
    "free_energy",
    "hidden_probs",
    "visible_probs",
    "sample_hidden",
    "sample_visible",
    "block_gibbs_step",
    "cd_gradient",
    "logit_of_mean",
]


def _affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x @ weight + bias`` for x (..., n_in); fused addmm on the common 2-D case."""
    if x.dim() == 2:
        return torch.addmm(bias, x, weight)
    return x @ weight + bias


def free_energy(v: Tensor, W: Tensor, b_v: Tensor, b_h: Tensor) -> Tensor:
    """Free energy F(v) = -log sum_h exp(-E(v, h)).

    v: (..., V), W: (V, H), b_v: (V,), b_h: (H,)  ->  (...,)
    """
    return -(v @ b_v) - F.softplus(_affine(v, W, b_h)).sum(-1)


def hidden_probs(v: Tensor, W: Tensor, b_h: Tensor) -> Tensor:
    """p(h_j = 1 | v) for every hidden unit.  v: (..., V) -> (..., H)."""
    return torch.sigmoid(_affine(v, W, b_h))


def visible_probs(h: Tensor, W: Tensor, b_v: Tensor) -> Tensor:
    """p(v_i = 1 | h) for every visible unit.  h: (..., H) -> (..., V)."""
    return torch.sigmoid(_affine(h, W.T, b_v))


def sample_hidden(
    v: Tensor, W: Tensor, b_h: Tensor, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sample h ~ p(h | v).  v: (..., V) -> (h sample (..., H), probabilities (..., H))."""
    p = hidden_probs(v, W, b_h)
    return bernoulli(p, generator), p


def sample_visible(
    h: Tensor, W: Tensor, b_v: Tensor, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sample v ~ p(v | h).  h: (..., H) -> (v sample (..., V), probabilities (..., V))."""
    p = visible_probs(h, W, b_v)
    return bernoulli(p, generator), p


def block_gibbs_step(
    v: Tensor, W: Tensor, b_v: Tensor, b_h: Tensor, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One block Gibbs step v -> h ~ p(h|v) -> v' ~ p(v|h).

    v: (..., V) -> (v' (..., V), the hidden sample h (..., H) used to draw it).
    """
    h, _ = sample_hidden(v, W, b_h, generator=generator)
    v_new, _ = sample_visible(h, W, b_v, generator=generator)
    return v_new, h


class CDResult(NamedTuple):
    """What one contrastive-divergence estimate returns.

    grads: ascent direction of the mean log-likelihood, positive minus negative phase,
        keyed like the parameters: ``W`` (V, H), ``b_v`` (V,), ``b_h`` (H,).
    v_negative: (C, V) visible states the negative statistics were taken at.
    h_negative: (C, H) hidden *sample* drawn from p(h | v_negative): the state from which a
        persistent chain continues (None for plain CD, which does not need it).
    reconstruction: (B, V) p(v | h0) with h0 ~ p(h | v_data), the first down-pass of CD
        (None for PCD, whose chains do not start at the data).
    data_free_energy: (B,) F(v_data) from the positive pass (None when not asked for).
    h_data_probs: (B, H) p(h | v_data), the positive-phase hidden probabilities.
    weight_factors: (V, B + C), (B + C, H) whose product is ``grads["W"]``, for a caller that
        folds the product into its own update (``cd_gradient(..., weight_grad=False)``).
    """

    grads: dict[str, Tensor]
    v_negative: Tensor
    h_negative: Tensor | None
    reconstruction: Tensor | None
    data_free_energy: Tensor | None
    h_data_probs: Tensor
    weight_factors: tuple[Tensor, Tensor]


_SCALES: dict[tuple, Tensor] = {}


def _phase_scale(n_pos: int, n_neg: int, like: Tensor) -> Tensor:
    """The column (B + C, 1) of 1/B for the data rows and -1/C for the model's, made once per
    shape, dtype and device (three small writes cost more than a small CD step's GEMMs)."""
    key = (n_pos, n_neg, like.dtype, like.device)
    if key not in _SCALES:
        with torch.inference_mode(False), torch.no_grad():
            scale = torch.empty(n_pos + n_neg, 1, dtype=like.dtype, device=like.device)
            scale[:n_pos] = 1.0 / n_pos
            scale[n_pos:] = -1.0 / n_neg
        _SCALES[key] = scale
    return _SCALES[key]


def cd_gradient(
    v_data: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    *,
    k: int = 1,
    generator: torch.Generator,
    h_chain: Tensor | None = None,
    with_free_energy: bool = True,
    weight_grad: bool = True,
) -> CDResult:
    """Contrastive-divergence (CD-k) or persistent-CD estimate of the likelihood gradient.

    Positive phase: <v h'> under the data and p(h | v_data) (hidden probabilities, which
    is the Rao-Blackwellized and lower-variance choice). Negative phase: k block Gibbs
    steps, started from a hidden sample of the data (CD-k) or from the persistent hidden
    states ``h_chain`` (PCD); statistics use the final visible sample and p(h | v).

    v_data: (B, V) values in [0, 1];  h_chain: (C, H) binary, or None for CD-k.
    with_free_energy=False skips F(v_data) (``data_free_energy`` is then None), which a training
    loop needs only on the batches it monitors. weight_grad=False leaves ``W`` out of the
    grads (it is the product of ``weight_factors``).
    Returns a :class:`CDResult`; grads are means over their batches (positive over B,
    negative over C), so B and C may differ.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n_visible, n_hidden = W.shape
    check_batch(v_data, n_visible, "v_data")
    check_generator(generator)
    if h_chain is not None:
        check_batch(h_chain, n_hidden, "h_chain")
    n_pos = v_data.shape[0]
    WT = W.T

    if h_chain is None:  # CD-k: the chain starts from a hidden sample of the data
        x_pos = _affine(v_data, W, b_h)  # (B, H)
        h_pos = torch.sigmoid(x_pos)  # (B, H)
        h = bernoulli(h_pos, generator)  # (B, H)
    else:
        h = h_chain  # (C, H)
    reconstruction = None
    for step in range(k):
        v_prob = torch.sigmoid(_affine(h, WT, b_v))  # (C, V)
        v = bernoulli(v_prob, generator)  # (C, V)
        if step == 0 and h_chain is None:
            reconstruction = v_prob
        if step < k - 1:
            h = bernoulli(torch.sigmoid(_affine(v, W, b_h)), generator)
    n_neg = v.shape[0]

    # One (B + C, V) block holds both phases' visible states, so that the last up-pass
    # (and for PCD the data's up-pass with it) and both weight statistics are single GEMMs:
    # <v h'>_data - <v h'>_model = [v_data; v]' [h_pos / B; -h_neg / C].
    both = torch.cat((v_data, v))  # (B + C, V)
    scale = _phase_scale(n_pos, n_neg, both)  # (B + C, 1): 1/B for data rows, -1/C for model
    if h_chain is None:
        h_prob = torch.sigmoid(_affine(v, W, b_h))  # (C, H)
        coef = torch.cat((h_pos, h_prob)).mul_(scale)  # (B + C, H)
    else:
        x_both = _affine(both, W, b_h)  # (B + C, H)
        x_pos = x_both[:n_pos]
        h_both = torch.sigmoid(x_both)
        h_pos, h_prob = h_both[:n_pos], h_both[n_pos:]
        coef = h_both * scale  # (B + C, H)
    h_next = bernoulli(h_prob, generator) if h_chain is not None else None
    data_fe = None
    if with_free_energy:
        data_fe = -(v_data @ b_v) - F.softplus(x_pos).sum(-1)  # (B,)

    grads = {
        "b_v": torch.mv(both.T, scale.view(-1)),  # (V,)
        "b_h": coef.sum(0),  # (H,)
    }
    if weight_grad:
        grads["W"] = torch.mm(both.T, coef)  # (V, H)
    return CDResult(grads, v, h_next, reconstruction, data_fe, h_pos, (both.T, coef))


def logit_of_mean(data: Tensor, eps: float = 1e-2) -> Tensor:
    """log(p / (1 - p)) of each column's mean p, clipped to [eps, 1 - eps].

    data: (N, V) with values in [0, 1] -> (V,). The practical guide's visible-bias
    initialisation, and the base-rate model of AIS.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] == 0:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a non-empty (N, V) tensor, got {shape}")
    check_unit_interval(data, "data")
    p = data.double().mean(0).clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


class RBM(nn.Module):
    """Bernoulli-Bernoulli RBM: parameters ``W`` (V, H), ``b_v`` (V,), ``b_h`` (H,).

    Initialisation follows the practical guide: W ~ N(0, 0.01^2), biases 0.
    Persistent chains for PCD live in the buffers ``persistent_v`` (C, V) and
    ``persistent_h`` (C, H) (empty until the first PCD step).
    """

    def __init__(self, n_visible: int, n_hidden: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self.n_visible = check_units(n_visible, "n_visible")
        self.n_hidden = check_units(n_hidden, "n_hidden")
        W = torch.empty(n_visible, n_hidden)
        nn.init.normal_(W, 0.0, 0.01, generator=generator)
        self.W = nn.Parameter(W)
        self.b_v = nn.Parameter(torch.zeros(n_visible))
        self.b_h = nn.Parameter(torch.zeros(n_hidden))
        self.register_buffer("persistent_v", torch.zeros(0, n_visible))
        self.register_buffer("persistent_h", torch.zeros(0, n_hidden))

    def extra_repr(self) -> str:
        return f"n_visible={self.n_visible}, n_hidden={self.n_hidden}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of persistent chains is state, not architecture: resize the empty
        # buffers to whatever the checkpoint holds before the default loader copies them.
        for name in ("persistent_v", "persistent_h"):
            key = prefix + name
            if key in state_dict:
                src = state_dict[key]
                buf = getattr(self, name)
                setattr(self, name, buf.new_empty(src.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- thin wrappers over the pure functions -------------------------------------------

    def free_energy(self, v: Tensor) -> Tensor:
        """F(v).  v: (..., V) -> (...,)."""
        return free_energy(
            check_last_dim(as_input(v, self.W), self.n_visible, "v"), self.W, self.b_v, self.b_h
        )

    def hidden_probs(self, v: Tensor) -> Tensor:
        """p(h = 1 | v).  v: (..., V) -> (..., H)."""
        return hidden_probs(
            check_last_dim(as_input(v, self.W), self.n_visible, "v"), self.W, self.b_h
        )

    def visible_probs(self, h: Tensor) -> Tensor:
        """p(v = 1 | h).  h: (..., H) -> (..., V)."""
        return visible_probs(
            check_last_dim(as_input(h, self.W), self.n_hidden, "h"), self.W, self.b_v
        )

    def sample_hidden(self, v: Tensor, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_generator(generator)
        v = check_last_dim(as_input(v, self.W), self.n_visible, "v")
        return sample_hidden(v, self.W, self.b_h, generator=generator)

    def sample_visible(self, h: Tensor, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_generator(generator)
        h = check_last_dim(as_input(h, self.W), self.n_hidden, "h")
        return sample_visible(h, self.W, self.b_v, generator=generator)

    @torch.no_grad()
    def gibbs(self, v: Tensor, n_steps: int, *, generator: torch.Generator) -> Tensor:
        """Run ``n_steps`` block Gibbs steps from v (B, V); return the final visible sample."""
        v = as_input(v, self.W)
        check_batch(v, self.n_visible, "v")
        check_generator(generator)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative integer, got {n_steps!r}")
        for _ in range(n_steps):
            v, _ = block_gibbs_step(v, self.W, self.b_v, self.b_h, generator=generator)
        return v

    @torch.no_grad()
    def init_visible_bias_from(self, data: Tensor, eps: float = 1e-2) -> None:
        """Set b_v = log(p / (1 - p)) from the data's per-pixel means (practical guide)."""
        data = as_input(data, self.W)
        check_batch(data, self.n_visible, "data")
        self.b_v.copy_(logit_of_mean(data, eps).to(self.b_v))

    # -- learning signals ----------------------------------------------------------------

    @torch.no_grad()
    def reset_persistent_chains(self, n_chains: int, *, generator: torch.Generator) -> None:
        """Start ``n_chains`` persistent chains from uniformly random hidden states."""
        check_units(n_chains, "n_chains")
        check_generator(generator)
        p = self.b_h.new_full((n_chains, self.n_hidden), 0.5)
        self.persistent_h = bernoulli(p, generator)
        self.persistent_v = self.b_v.new_zeros(n_chains, self.n_visible)

    @torch.no_grad()
    def cd_gradient(self, v_data: Tensor, *, k: int = 1, generator: torch.Generator) -> CDResult:
        """CD-k estimate of the mean log-likelihood gradient for the batch v_data (B, V)."""
        v_data = as_input(v_data, self.W)
        check_batch(v_data, self.n_visible, "v_data")
        check_unit_interval(v_data, "v_data")
        return cd_gradient(v_data, self.W, self.b_v, self.b_h, k=k, generator=generator)

    @torch.no_grad()
    def pcd_gradient(
        self,
        v_data: Tensor,
        *,
        k: int = 1,
        generator: torch.Generator,
        n_chains: int | None = None,
    ) -> CDResult:
        """Persistent-CD estimate; advances the chains in the buffers by k steps.

        The chains are (re)started from random states when none exist yet or when
        ``n_chains`` (default: the batch size at first use) differs from their number.
        """
        v_data = as_input(v_data, self.W)
        check_batch(v_data, self.n_visible, "v_data")
        check_unit_interval(v_data, "v_data")
        check_generator(generator)
        if n_chains is None:
            n_chains = self.persistent_h.shape[0] or v_data.shape[0]
        if self.persistent_h.shape[0] != n_chains:
            self.reset_persistent_chains(n_chains, generator=generator)
        result = cd_gradient(
            v_data, self.W, self.b_v, self.b_h, k=k, generator=generator, h_chain=self.persistent_h
        )
        self.persistent_v = result.v_negative
        self.persistent_h = result.h_negative
        return result
