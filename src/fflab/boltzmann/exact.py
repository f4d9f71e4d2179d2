"""Exact partition functions, log-probabilities and likelihood gradients by enumeration.

Only for small models, and the oracle every sampler and estimator here is tested against.
Everything is computed in float64 with logsumexp, in chunks of at most 2**16 states, and
stays differentiable (autograd through these functions gives the exact gradient too).

- RBM: enumerate the *smaller* layer and sum the other analytically, so a 784 x 20 RBM is
  exact (2**20 hidden states); the limit is 24 units on the smaller side.
- General Boltzmann machine: enumerate all 2**(V + H) joint states; limit 24 units in all
  (hiddens of each data vector are enumerated for the positive phase).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import as_input, check_batch, check_binary
from .bm import BoltzmannMachine, pairwise_statistics
from .rbm import RBM

__all__ = ["MAX_EXACT_UNITS", "exact_log_z", "exact_log_prob", "exact_gradient", "binary_states"]

MAX_EXACT_UNITS = 24
_CHUNK = 1 << 16


def binary_states(n: int, start: int = 0, stop: int | None = None, **kw) -> Tensor:
    """Rows start..stop-1 of the 2**n binary vectors, bit i of the integer in column i.

    -> (stop - start, n); keyword arguments (dtype, device) go to the tensor.
    """
    stop = 1 << n if stop is None else stop
    idx = torch.arange(start, stop, device=kw.get("device"))
    bits = torch.arange(n, device=kw.get("device"))
    return ((idx[:, None] >> bits) & 1).to(kw.get("dtype", torch.float64))


def _chunks(n: int, device) -> Iterator[Tensor]:
    total = 1 << n
    for start in range(0, total, _CHUNK):
        stop = min(total, start + _CHUNK)
        yield binary_states(n, start, stop, dtype=torch.float64, device=device)


def _params64(model) -> dict[str, Tensor]:
    return {name: p.double() for name, p in model.named_parameters()}


def _check_model(model) -> None:
    if isinstance(model, RBM):
        n = min(model.n_visible, model.n_hidden)
        what = f"{n} units on the smaller side of the RBM"
    elif isinstance(model, BoltzmannMachine):
        n = model.n_units
        what = f"{n} units"
    else:
        raise ValueError(f"model must be an RBM or a BoltzmannMachine, got {type(model).__name__}")
    if n > MAX_EXACT_UNITS:
        raise ValueError(f"model too large for exact enumeration: {what} (limit {MAX_EXACT_UNITS})")


def _rbm_enumerates_hidden(model: RBM) -> bool:
    return model.n_hidden <= model.n_visible


def _rbm_log_weights(states: Tensor, p: dict[str, Tensor], over_hidden: bool) -> Tensor:
    """log of the unnormalized marginal of each enumerated state of the smaller layer.

    over hidden: log p*(h) = b_h.h + sum_i softplus(b_v_i + (W h)_i);
    over visible: log p*(v) = -F(v).  states: (K, n) -> (K,)
    """
    if over_hidden:
        return states @ p["b_h"] + F.softplus(torch.addmm(p["b_v"], states, p["W"].T)).sum(-1)
    return states @ p["b_v"] + F.softplus(torch.addmm(p["b_h"], states, p["W"])).sum(-1)


def _bm_neg_energy(s: Tensor, p: dict[str, Tensor], n_visible: int) -> Tensor:
    v, h = s[:, :n_visible], s[:, n_visible:]
    return (
        v @ p["b_v"]
        + h @ p["b_h"]
        + 0.5 * ((v @ p["L"]) * v).sum(-1)
        + 0.5 * ((h @ p["J"]) * h).sum(-1)
        + ((v @ p["W"]) * h).sum(-1)
    )


def _log_z(model, p: dict[str, Tensor]) -> Tensor:
    device = p["W"].device
    if isinstance(model, RBM):
        over_h = _rbm_enumerates_hidden(model)
        n = model.n_hidden if over_h else model.n_visible
        parts = [torch.logsumexp(_rbm_log_weights(s, p, over_h), 0) for s in _chunks(n, device)]
    else:
        parts = [
            torch.logsumexp(_bm_neg_energy(s, p, model.n_visible), 0)
            for s in _chunks(model.n_units, device)
        ]
    return torch.logsumexp(torch.stack(parts), 0)


def exact_log_z(model: RBM | BoltzmannMachine, *, grad: bool = False) -> Tensor:
    """log Z of a small RBM or Boltzmann machine, a float64 scalar.

    With ``grad`` the result keeps its autograd graph (for exact gradients by autograd);
    without, it is a plain value (``float(exact_log_z(rbm))`` as it is).
    """
    _check_model(model)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return _log_z(model, _params64(model))


def _bm_log_sum_hidden(v: Tensor, p: dict[str, Tensor], n_hidden: int) -> Tensor:
    """log sum_h exp(-E(v, h)) for each row of v (B, V) -> (B,)."""
    const = v @ p["b_v"] + 0.5 * ((v @ p["L"]) * v).sum(-1)  # (B,)
    vw = v @ p["W"]  # (B, H)
    parts = []
    for hs in _chunks(n_hidden, v.device):  # (K, H)
        h_terms = hs @ p["b_h"] + 0.5 * ((hs @ p["J"]) * hs).sum(-1)  # (K,)
        parts.append(torch.logsumexp(vw @ hs.T + h_terms, 1))  # (B,)
    return const + torch.logsumexp(torch.stack(parts, 1), 1)


def _check_data(model, v: Tensor) -> Tensor:
    v = as_input(v, torch.empty((), dtype=torch.float64, device=_device(model)))
    check_batch(v, model.n_visible, "v")
    check_binary(v, "v")
    return v.double()


def exact_log_prob(model: RBM | BoltzmannMachine, v, *, grad: bool = False) -> Tensor:
    """Exact log p(v) of each binary row of v (B, V) -> (B,) float64.

    ``v``: a tensor or numpy array of 0/1 values. ``grad`` as in :func:`exact_log_z`.
    """
    _check_model(model)
    v = _check_data(model, v)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        p = _params64(model)
        log_z = _log_z(model, p)
        if isinstance(model, RBM):
            b_h = torch.addmm(p["b_h"], v, p["W"])
            return v @ p["b_v"] + F.softplus(b_h).sum(-1) - log_z
        return _bm_log_sum_hidden(v, p, model.n_hidden) - log_z


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _rbm_gradient(model: RBM, v: Tensor, p: dict[str, Tensor]) -> dict[str, Tensor]:
    h_pos = torch.sigmoid(torch.addmm(p["b_h"], v, p["W"]))  # (B, H)
    n = v.shape[0]
    pos = {"W": v.T @ h_pos / n, "b_v": v.mean(0), "b_h": h_pos.mean(0)}

    over_h = _rbm_enumerates_hidden(model)
    log_z = _log_z(model, p)
    neg = {name: torch.zeros_like(t) for name, t in pos.items()}
    for s in _chunks(model.n_hidden if over_h else model.n_visible, v.device):
        prob = torch.exp(_rbm_log_weights(s, p, over_h) - log_z)  # (K,)
        if over_h:  # E[v | h] analytically
            hs, vs = s, torch.sigmoid(torch.addmm(p["b_v"], s, p["W"].T))
        else:  # E[h | v] analytically
            vs, hs = s, torch.sigmoid(torch.addmm(p["b_h"], s, p["W"]))
        pv = vs * prob[:, None]
        neg["W"] += pv.T @ hs
        neg["b_v"] += pv.sum(0)
        neg["b_h"] += prob @ hs
    return {name: pos[name] - neg[name] for name in pos}


@torch.no_grad()
def _bm_gradient(model: BoltzmannMachine, v: Tensor, p: dict[str, Tensor]) -> dict[str, Tensor]:
    n_v, n_h = model.n_visible, model.n_hidden
    # Positive phase: p(h | v_b) for each data row, pooled over rows. With q_k the
    # data-averaged posterior mass of hidden state k, <hh'> and <h> are sums over k, and
    # <v h'> = v' E[h | v] / B.
    log_norm = _bm_log_sum_hidden(v, p, n_h)  # (B,)
    const = v @ p["b_v"] + 0.5 * ((v @ p["L"]) * v).sum(-1)
    vw = v @ p["W"]
    n = v.shape[0]
    e_h = v.new_zeros(n, n_h)
    hh = v.new_zeros(n_h, n_h)
    for hs in _chunks(n_h, v.device):
        h_terms = hs @ p["b_h"] + 0.5 * ((hs @ p["J"]) * hs).sum(-1)
        post = torch.exp(vw @ hs.T + h_terms + (const - log_norm)[:, None])  # (B, K)
        e_h += post @ hs
        q = post.mean(0)  # (K,)
        hh += (hs * q[:, None]).T @ hs
    hh.fill_diagonal_(0.0)
    vv = v.T @ v / n
    vv.fill_diagonal_(0.0)
    pos = {"W": v.T @ e_h / n, "L": vv, "J": hh, "b_v": v.mean(0), "b_h": e_h.mean(0)}

    log_z = _log_z(model, p)
    neg = {name: torch.zeros_like(t) for name, t in pos.items()}
    for s in _chunks(n_v + n_h, v.device):
        prob = torch.exp(_bm_neg_energy(s, p, n_v) - log_z)
        for name, t in pairwise_statistics(s[:, :n_v], s[:, n_v:], prob).items():
            neg[name] += t
    return {name: pos[name] - neg[name] for name in pos}


def exact_gradient(model: RBM | BoltzmannMachine, data: Tensor) -> dict[str, Tensor]:
    """Exact gradient of the mean log-likelihood of binary data (N, V), in float64.

    Positive minus negative expectations of -dE/dtheta, keyed by parameter name. For the
    Boltzmann machine's L and J, the entry (i, j) is the derivative with respect to the
    tied pair L_ij = L_ji (<v_i v_j>_data - <v_i v_j>_model), with a zero diagonal.
    """
    _check_model(model)
    v = _check_data(model, data)
    p = {name: t.detach() for name, t in _params64(model).items()}
    if isinstance(model, RBM):
        return _rbm_gradient(model, v, p)
    return _bm_gradient(model, v, p)
