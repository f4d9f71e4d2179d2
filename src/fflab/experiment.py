"""What the run loop needs from an algorithm, and the registry of algorithms.

An :class:`Experiment` owns a model, its optimizer and its data for one run. The run loop
(:mod:`fflab.runs`) handles everything else: run directories, checkpoints, resume, progress,
divergence, summaries. Registering an algorithm is one entry in :data:`ALGORITHMS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from fflab.config import RunConfig
from fflab.data import Datasets

# on_batch(samples_done_in_epoch, values) -> None, for progress bars and divergence checks.
# ``values`` is {name: value} or a function returning it: the run loop calls it only when it
# shows values (about twice a second), so reading them back from a GPU does not stall every
# step.
BatchValues = dict[str, float] | Callable[[], dict[str, float]]
BatchCallback = Callable[[int, BatchValues], None]


class Experiment(Protocol):
    epochs: int  # total epochs of the run
    samples_per_epoch: int

    def train_epoch(
        self, epoch: int, generator: torch.Generator, on_batch: BatchCallback
    ) -> dict[str, float]:
        """Train one epoch; return per-epoch metrics (must include a finite ``loss``)."""

    def evaluate(self) -> dict[str, Any]:
        """Final metrics for ``summary.json`` (test numbers are computed only here)."""

    def epoch_evaluation(self) -> dict[str, float]:
        """Cheap per-epoch metrics (validation error; test error only if asked for)."""

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything needed to resume: tensors and JSON-able metadata."""

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None: ...

    def parameters_finite(self) -> bool: ...


@dataclass(frozen=True)
class Algorithm:
    """An algorithm: its config sections and how to build an experiment from a run config."""

    name: str
    model_config: str  # "module:Class"
    train_config: str
    factory: str  # "module:function(config, data, device, generator) -> Experiment"
    model: str  # "module:function(model config) -> nn.Module" (what fflab.load_run returns)

    @staticmethod
    def _load(ref: str) -> Any:
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)

    def model_cls(self) -> type:
        return self._load(self.model_config)

    def train_cls(self) -> type:
        return self._load(self.train_config)

    def build_model(self, model_config: Any) -> torch.nn.Module:
        return self._load(self.model)(model_config)

    def build(
        self, config: RunConfig, data: Datasets, device: torch.device, generator: torch.Generator
    ) -> Experiment:
        return self._load(self.factory)(config, data, device, generator)


ALGORITHMS = {
    "ff": Algorithm(
        "ff",
        "fflab.ff.model:FFNetConfig",
        "fflab.ff.train:FFTrainConfig",
        "fflab.ff.experiment:build",
        "fflab.ff.model:FFNet",
    ),
    "ff-recurrent": Algorithm(
        "ff-recurrent",
        "fflab.ff.recurrent:RecurrentFFConfig",
        "fflab.ff.train:FFTrainConfig",
        "fflab.ff.recurrent_train:build",
        "fflab.ff.recurrent:RecurrentFFNet",
    ),
    "bp": Algorithm(
        "bp",
        "fflab.backprop:BPNetConfig",
        "fflab.backprop:BPTrainConfig",
        "fflab.backprop:build",
        "fflab.backprop:BPNet",
    ),
    "rbm": Algorithm(
        "rbm",
        "fflab.boltzmann.rbm_experiment:RBMConfig",
        "fflab.boltzmann.rbm_experiment:RBMTrainConfig",
        "fflab.boltzmann.rbm_experiment:build_rbm",
        "fflab.boltzmann.rbm_experiment:rbm_model",
    ),
    "class-rbm": Algorithm(
        "class-rbm",
        "fflab.boltzmann.class_rbm_experiment:ClassRBMConfig",
        "fflab.boltzmann.class_rbm_experiment:ClassRBMTrainConfig",
        "fflab.boltzmann.class_rbm_experiment:build_class_rbm",
        "fflab.boltzmann.class_rbm_experiment:class_rbm_model",
    ),
    "bm": Algorithm(
        "bm",
        "fflab.boltzmann.bm_experiment:BMConfig",
        "fflab.boltzmann.bm_experiment:BMTrainConfig",
        "fflab.boltzmann.bm_experiment:build_bm",
        "fflab.boltzmann.bm_experiment:bm_model",
    ),
}
