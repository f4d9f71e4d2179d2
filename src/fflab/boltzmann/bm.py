"""General (fully connected) Boltzmann machine with visible and hidden units.

Energy, as in the seed::

    E(v, h) = -b_v.v - b_h.h - 1/2 v'Lv - 1/2 h'Jh - v'Wh

with L (V, V) and J (H, H) symmetric with zero diagonals, W (V, H). Stacking s = [v; h]
gives E(s) = -b.s - 1/2 s'As with the symmetric, zero-diagonal block matrix
A = [[L, W], [W', J]], and the single-site conditional p(s_i = 1 | s_-i) = sigmoid(b_i + (As)_i).

Learning follows the seed: the gradient of the mean log-likelihood is the positive phase
(data clamped, hiddens sampled from p(h | v)) minus the negative phase (free-running model).
For a tied pair L_ij = L_ji the derivative is <v_i v_j>_data - <v_i v_j>_model; this is the
convention of every gradient dict here (the diagonal entry is 0).

Sampling is sequential single-site Gibbs, with many chains in parallel as one batch. The
negative phase uses persistent chains held in the registered buffer ``persistent_chains``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fflab.optim import MomentumSGD

from ._checks import (
    bernoulli,
    check_batch,
    check_generator,
    check_unit_interval,
    check_units,
)

__all__ = [
    "BoltzmannMachine",
    "bm_energy",
    "bm_optimizer",
    "joint_weights",
    "gibbs_sweep",
    "mean_field_hidden",
    "pairwise_statistics",
    "statistics_difference",
]


def bm_energy(
    v: Tensor, h: Tensor, W: Tensor, L: Tensor, J: Tensor, b_v: Tensor, b_h: Tensor
) -> Tensor:
    """E(v, h).  v: (..., V), h: (..., H) -> (...,). L and J are used as given."""
    return (
        -(v @ b_v)
        - (h @ b_h)
        - 0.5 * ((v @ L) * v).sum(-1)
        - 0.5 * ((h @ J) * h).sum(-1)
        - ((v @ W) * h).sum(-1)
    )


def joint_weights(W: Tensor, L: Tensor, J: Tensor) -> Tensor:
    """The block matrix A = [[L, W], [W', J]] over s = [v; h].  -> (V + H, V + H)."""
    return torch.cat([torch.cat([L, W], 1), torch.cat([W.T, J], 1)], 0)


def gibbs_sweep(
    s: Tensor,
    A: Tensor,
    b: Tensor,
    *,
    generator: torch.Generator,
    start: int = 0,
    n_sweeps: int = 1,
) -> Tensor:
    """Sequential single-site Gibbs sweeps over units ``start, ..., D - 1``.

    s: (B, D) binary states (B chains in parallel), A: (D, D) symmetric with zero
    diagonal, b: (D,). Units before ``start`` stay clamped (e.g. start = V clamps the
    visibles for the positive phase). Returns a new (B, D) tensor; s is not modified.
    """
    s = s.clone()
    n_units = s.shape[1]
    # One (B, D-start) block of uniforms per sweep: fewer, larger RNG calls.
    for _ in range(n_sweeps):
        u = torch.rand(
            (s.shape[0], n_units - start), generator=generator, dtype=s.dtype, device=s.device
        )
        for i in range(start, n_units):
            field = torch.mv(s, A[i]) + b[i]  # (B,); A symmetric, A_ii = 0 so s_i drops out
            s[:, i] = (u[:, i - start] < torch.sigmoid(field)).to(s.dtype)
    return s


def mean_field_hidden(
    v: Tensor,
    W: Tensor,
    J: Tensor,
    b_h: Tensor,
    *,
    n_iters: int = 30,
    damping: float = 0.5,
) -> Tensor:
    """Damped mean-field fixed point mu = sigmoid(b_h + vW + J mu) for q(h | v).

    v: (B, V) -> mu: (B, H). Exact when J = 0 (then p(h | v) factorizes).
    """
    x = torch.addmm(b_h, v, W)  # (B, H)
    mu = torch.sigmoid(x)
    for _ in range(n_iters):
        mu = damping * mu + (1.0 - damping) * torch.sigmoid(x + mu @ J)
    return mu


def pairwise_statistics(v: Tensor, h: Tensor, weights: Tensor | None = None) -> dict[str, Tensor]:
    """Sufficient statistics averaged over a batch: the expected -dE/dtheta.

    v: (B, V), h: (B, H) (binary samples or, for h, conditional means), weights: (B,)
    summing to 1 (default uniform). Returns ``W`` = <v h'>, ``L`` = <v v'>, ``J`` = <h h'>
    with zeroed diagonals, ``b_v`` = <v>, ``b_h`` = <h>.
    """
    if weights is None:
        weights = v.new_full((v.shape[0],), 1.0 / v.shape[0])
    wv = v * weights[:, None]
    wh = h * weights[:, None]
    vv = wv.T @ v
    hh = wh.T @ h
    vv.fill_diagonal_(0.0)
    hh.fill_diagonal_(0.0)
    return {"W": wv.T @ h, "L": vv, "J": hh, "b_v": wv.sum(0), "b_h": wh.sum(0)}


def statistics_difference(pos: dict[str, Tensor], neg: dict[str, Tensor]) -> dict[str, Tensor]:
    """Positive minus negative phase, key by key: the log-likelihood ascent direction."""
    return {name: pos[name] - neg[name] for name in pos}


class BoltzmannMachine(nn.Module):
    """General Boltzmann machine: parameters ``W`` (V, H), ``L`` (V, V), ``J`` (H, H),
    ``b_v`` (V,), ``b_h`` (H,); L and J symmetric with zero diagonals.

    The constraint is kept by :meth:`project_` (symmetrize, zero the diagonal), called at
    construction and after every :meth:`apply_gradient_`; gradients from this module are
    already symmetric with zero diagonals, so plain SGD keeps it too.
    Persistent negative chains (C, V + H) live in the buffer ``persistent_chains``.
    """

    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        *,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.n_visible = check_units(n_visible, "n_visible")
        self.n_hidden = check_units(n_hidden, "n_hidden")
        if not init_std >= 0.0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}")

        def normal(*shape: int) -> Tensor:
            return torch.empty(*shape).normal_(0.0, init_std, generator=generator)

        self.W = nn.Parameter(normal(n_visible, n_hidden))
        self.L = nn.Parameter(normal(n_visible, n_visible))
        self.J = nn.Parameter(normal(n_hidden, n_hidden))
        self.b_v = nn.Parameter(torch.zeros(n_visible))
        self.b_h = nn.Parameter(torch.zeros(n_hidden))
        self.register_buffer("persistent_chains", torch.zeros(0, n_visible + n_hidden))
        self.project_()

    def extra_repr(self) -> str:
        return f"n_visible={self.n_visible}, n_hidden={self.n_hidden}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "persistent_chains"
        if key in state_dict:  # the number of chains is state, not architecture
            self.persistent_chains = self.persistent_chains.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n_units(self) -> int:
        return self.n_visible + self.n_hidden

    @torch.no_grad()
    def project_(self) -> None:
        """Make L and J symmetric with zero diagonals, in place."""
        for M in (self.L, self.J):
            M.copy_(0.5 * (M + M.T))
            M.fill_diagonal_(0.0)

    def energy(self, v: Tensor, h: Tensor) -> Tensor:
        """E(v, h).  v: (..., V), h: (..., H) -> (...,)."""
        return bm_energy(v, h, self.W, self.L, self.J, self.b_v, self.b_h)

    def joint_weights(self) -> tuple[Tensor, Tensor]:
        """(A (D, D), b (D,)) over s = [v; h]."""
        return joint_weights(self.W, self.L, self.J), torch.cat([self.b_v, self.b_h])

    @torch.no_grad()
    def sample(
        self, s: Tensor, n_sweeps: int, *, generator: torch.Generator, clamp_visible: bool = False
    ) -> Tensor:
        """Run ``n_sweeps`` sequential Gibbs sweeps on chains s (B, V + H)."""
        check_batch(s, self.n_units, "s")
        check_generator(generator)
        A, b = self.joint_weights()
        start = self.n_visible if clamp_visible else 0
        return gibbs_sweep(s, A, b, generator=generator, start=start, n_sweeps=n_sweeps)

    @torch.no_grad()
    def reset_persistent_chains(self, n_chains: int, *, generator: torch.Generator) -> None:
        """Start ``n_chains`` free-running chains from uniformly random states."""
        check_units(n_chains, "n_chains")
        check_generator(generator)
        p = self.b_v.new_full((n_chains, self.n_units), 0.5)
        self.persistent_chains = bernoulli(p, generator)

    @torch.no_grad()
    def positive_statistics(
        self,
        v_data: Tensor,
        *,
        generator: torch.Generator,
        method: str = "gibbs",
        n_sweeps: int = 5,
    ) -> dict[str, Tensor]:
        """Data-clamped statistics (see :func:`pairwise_statistics`) for v_data (B, V).

        method="gibbs": hiddens start from the factorized p(h | v) ignoring J, then
        ``n_sweeps`` sequential sweeps over the hiddens with v clamped; the final sample
        is used. method="mean_field": q(h | v) from :func:`mean_field_hidden` (<h h'> is
        then mu mu', exact only when J = 0).
        """
        check_batch(v_data, self.n_visible, "v_data")
        check_unit_interval(v_data, "v_data")
        check_generator(generator)
        if method == "mean_field":
            mu = mean_field_hidden(v_data, self.W, self.J, self.b_h)
            return pairwise_statistics(v_data, mu)
        if method != "gibbs":
            raise ValueError(f"method must be 'gibbs' or 'mean_field', got {method!r}")
        h0 = bernoulli(torch.sigmoid(torch.addmm(self.b_h, v_data, self.W)), generator)
        s = self.sample(
            torch.cat([v_data, h0], 1), n_sweeps, generator=generator, clamp_visible=True
        )
        return pairwise_statistics(v_data, s[:, self.n_visible :])

    @torch.no_grad()
    def negative_statistics(
        self, *, generator: torch.Generator, n_sweeps: int = 1, n_chains: int | None = None
    ) -> dict[str, Tensor]:
        """Advance the persistent chains by ``n_sweeps`` sweeps and return their statistics.

        Chains are (re)started at random if none exist or their number differs from
        ``n_chains`` (default: keep the current number; 100 if there are none).
        """
        check_generator(generator)
        if n_chains is None:
            n_chains = self.persistent_chains.shape[0] or 100
        if self.persistent_chains.shape[0] != n_chains:
            self.reset_persistent_chains(n_chains, generator=generator)
        s = self.sample(self.persistent_chains, n_sweeps, generator=generator)
        self.persistent_chains = s
        return pairwise_statistics(s[:, : self.n_visible], s[:, self.n_visible :])

    @torch.no_grad()
    def gradient(
        self,
        v_data: Tensor,
        *,
        generator: torch.Generator,
        positive: str = "gibbs",
        positive_sweeps: int = 5,
        negative_sweeps: int = 1,
        n_chains: int | None = None,
    ) -> dict[str, Tensor]:
        """Sampled mean log-likelihood gradient: positive minus negative statistics.

        Keys are the parameter names; ``L`` and ``J`` follow the tied-pair convention.
        ``n_chains`` defaults to the batch size at first use.
        """
        pos = self.positive_statistics(
            v_data, generator=generator, method=positive, n_sweeps=positive_sweeps
        )
        if n_chains is None and self.persistent_chains.shape[0] == 0:
            n_chains = v_data.shape[0]
        neg = self.negative_statistics(
            generator=generator, n_sweeps=negative_sweeps, n_chains=n_chains
        )
        return statistics_difference(pos, neg)

    @torch.no_grad()
    def apply_gradient_(self, grads: dict[str, Tensor], optimizer: MomentumSGD) -> None:
        """One step of ``optimizer`` (see :func:`bm_optimizer`) on ``grads`` (keyed by
        parameter name), then the constraints on L and J restored."""
        for name, param in self.named_parameters():
            optimizer.fold_(param, grads[name])
        optimizer.step()
        self.project_()


def bm_optimizer(
    bm: BoltzmannMachine, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> MomentumSGD:
    """Momentum SGD ascent for ``bm``: ``v = m v + lr (g - wd p)`` with weight decay on W, L
    and J (not the biases), ``p += v``.

    Group 0 holds W, L, J (weight decay ``weight_decay``), group 1 the biases (none); set
    ``lr`` and ``momentum`` of both per epoch, as with any torch optimizer.
    """
    groups = [
        {"params": [bm.W, bm.L, bm.J], "weight_decay": weight_decay},
        {"params": [bm.b_v, bm.b_h], "weight_decay": 0.0},
    ]
    return MomentumSGD(groups, lr=lr, momentum=momentum, lr_in_velocity=True, maximize=True)
