"""fflab: layer-local contrastive learning (Forward-Forward, Boltzmann machines, RBMs).

The public surface is what this module exports; the implementation modules behind it are
``fflab.ff`` (FF networks, recurrent FF, layers, trainers, probes), ``fflab.negatives``,
``fflab.backprop``, ``fflab.boltzmann``, ``fflab.data``, ``fflab.optim`` and ``fflab.runs``.

Runs (run directories, checkpoints, resume, metrics): :func:`train`, :func:`load_run`, on a
preset's dataset or on in-memory data (:func:`from_arrays`). scikit-learn estimators live in
``fflab.sklearn`` (imported on its own, so scikit-learn stays optional); studies of FF's
claims in ``fflab.studies``.
"""

__version__ = "0.1.0"

from fflab.api import load_run, train
from fflab.backprop import BPNet, BPNetConfig
from fflab.boltzmann import (
    RBM,
    AISResult,
    BoltzmannMachine,
    ClassRBM,
    ais_log_z,
    average_log_prob,
    exact_log_prob,
    exact_log_z,
)
from fflab.data import Datasets, Split, from_arrays
from fflab.data import load as load_dataset
from fflab.ff.layers import Dense
from fflab.ff.local import LocallyConnected2d
from fflab.ff.model import FFNet, FFNetConfig, FFOutput
from fflab.ff.recurrent import RecurrentFFConfig, RecurrentFFNet
from fflab.ff.recurrent_train import RecurrentTrainer
from fflab.ff.reference import RecurrentReferenceTrainer, ReferenceTrainer
from fflab.ff.train import FFTrainConfig, FFTrainer
from fflab.negatives import NegativeBatch, NegativeSource, make_source
from fflab.negatives import register as register_negative_source
from fflab.optim import MomentumSGD

__all__ = [
    "AISResult",
    "BPNet",
    "BPNetConfig",
    "BoltzmannMachine",
    "ClassRBM",
    "Datasets",
    "Dense",
    "FFNet",
    "FFNetConfig",
    "FFOutput",
    "FFTrainConfig",
    "FFTrainer",
    "LocallyConnected2d",
    "MomentumSGD",
    "NegativeBatch",
    "NegativeSource",
    "RBM",
    "RecurrentFFConfig",
    "RecurrentFFNet",
    "RecurrentReferenceTrainer",
    "RecurrentTrainer",
    "ReferenceTrainer",
    "Split",
    "__version__",
    "ais_log_z",
    "average_log_prob",
    "exact_log_prob",
    "exact_log_z",
    "from_arrays",
    "load_dataset",
    "load_run",
    "make_source",
    "register_negative_source",
    "train",
]
