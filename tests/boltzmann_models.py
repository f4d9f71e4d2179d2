"""Small random Boltzmann models and binary-state enumeration, shared by the Boltzmann tests.

Deliberately independent of ``fflab.boltzmann.exact``: the tests enumerate states here.
"""

import itertools

import torch

from fflab.boltzmann import RBM, BoltzmannMachine


def all_states(n: int) -> torch.Tensor:
    """Every binary vector of length n, in lexicographic order -> (2**n, n) float64."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def random_rbm(n_visible, n_hidden, seed, std=1.0, bias_std=0.5, dtype=torch.float64) -> RBM:
    """An RBM with N(0, std) weights and N(0, bias_std) biases drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    rbm = RBM(n_visible, n_hidden).to(dtype)
    with torch.no_grad():
        rbm.W.normal_(0.0, std, generator=g)
        rbm.b_v.normal_(0.0, bias_std, generator=g)
        rbm.b_h.normal_(0.0, bias_std, generator=g)
    return rbm


def random_bm(n_visible, n_hidden, seed, std=1.0) -> BoltzmannMachine:
    """A general BM (lateral weights included) with N(0, std) weights, N(0, 0.5) biases."""
    g = torch.Generator().manual_seed(seed)
    bm = BoltzmannMachine(n_visible, n_hidden, init_std=std, generator=g).double()
    with torch.no_grad():
        bm.b_v.normal_(0.0, 0.5, generator=g)
        bm.b_h.normal_(0.0, 0.5, generator=g)
    return bm
