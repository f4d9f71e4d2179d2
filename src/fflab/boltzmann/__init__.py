"""Boltzmann machines and restricted Boltzmann machines: sampling, learning, evaluation.

- ``rbm``: Bernoulli-Bernoulli RBM, its conditionals, free energy, CD-k and PCD gradients.
- ``class_rbm``: classification RBM over an image and its label (Larochelle & Bengio 2008):
  free energy per label, p(y | v), discriminative, generative (CD-k) and hybrid gradients.
- ``bm``: general Boltzmann machine (lateral weights), sequential Gibbs, pairwise statistics.
- ``exact``: brute-force log Z, log p(v) and likelihood gradients for small models.
- ``ais``: annealed importance sampling of an RBM's log Z (Salakhutdinov & Murray 2008).
- ``train``: one epoch of RBM training with momentum SGD (:class:`fflab.optim.MomentumSGD`).
"""

from .ais import (
    AISResult,
    ais_log_weights,
    ais_log_z,
    average_log_prob,
    default_beta_schedule,
    make_base_rate_visible_bias,
)
from .bm import (
    BoltzmannMachine,
    bm_energy,
    bm_optimizer,
    gibbs_sweep,
    joint_weights,
    mean_field_hidden,
    pairwise_statistics,
    statistics_difference,
)
from .class_rbm import ClassRBM
from .exact import MAX_EXACT_UNITS, binary_states, exact_gradient, exact_log_prob, exact_log_z
from .rbm import (
    RBM,
    CDResult,
    block_gibbs_step,
    cd_gradient,
    free_energy,
    hidden_probs,
    logit_of_mean,
    sample_hidden,
    sample_visible,
    visible_probs,
)
from .train import momentum_schedule, rbm_optimizer, rbm_train_epoch

__all__ = [
    "AISResult",
    "BoltzmannMachine",
    "CDResult",
    "ClassRBM",
    "MAX_EXACT_UNITS",
    "RBM",
    "ais_log_weights",
    "ais_log_z",
    "average_log_prob",
    "binary_states",
    "block_gibbs_step",
    "bm_energy",
    "bm_optimizer",
    "cd_gradient",
    "default_beta_schedule",
    "exact_gradient",
    "exact_log_prob",
    "exact_log_z",
    "free_energy",
    "gibbs_sweep",
    "hidden_probs",
    "joint_weights",
    "logit_of_mean",
    "make_base_rate_visible_bias",
    "mean_field_hidden",
    "momentum_schedule",
    "pairwise_statistics",
    "rbm_optimizer",
    "rbm_train_epoch",
    "sample_hidden",
    "sample_visible",
    "statistics_difference",
    "visible_probs",
]
