"""An FF run, supervised or unsupervised: the glue between :class:`FFTrainer` and the run loop.

A supervised net is evaluated by goodness scoring and its softmax head. An unsupervised net is
evaluated by linear probes trained after FF on its frozen features: one on the layers the head
reads (``model.head_from``.., the paper's last three), stored as the net's head so that
``predict(x, "softmax")`` uses it, and one on each hidden layer alone.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from fflab.checkpoint import flatten_optimizer, unflatten_optimizer
from fflab.config import RunConfig
from fflab.data import Datasets, Split
from fflab.ff.model import FFNet
from fflab.ff.probe import ProbeConfig, fit_probes, layer_features, probe_error
from fflab.ff.train import FFTrainer


@torch.no_grad()
def error_rate(net: FFNet, split: Split, mode: str, batch_size: int) -> float:
    """Test error in percent of ``net`` on ``split`` by ``goodness`` or ``softmax``."""
    wrong = 0
    for i in range(0, len(split), batch_size):
        pred = net.predict(split.x[i : i + batch_size], mode)
        wrong += int((pred != split.y[i : i + batch_size]).sum())
    return 100.0 * wrong / max(len(split), 1)


class FFExperiment:
    """An FF run on the run loop; subclasses swap in another net and step (``net_cls``,
    ``trainer_cls``), as the recurrent net does."""

    net_cls, trainer_cls = FFNet, FFTrainer

    def __init__(self, config: RunConfig, data: Datasets, device: torch.device, generator):
        mcfg = config.model
        if mcfg.in_features != data.train.x.shape[1] or mcfg.num_classes != data.num_classes:
            raise ValueError(
                f"model expects {mcfg.in_features} features and {mcfg.num_classes} classes, "
                f"data has {data.train.x.shape[1]} and {data.num_classes}"
            )
        self.config = config
        self.data = data
        self.net = self.net_cls(mcfg, generator=generator).to(device)
        self.trainer = self.trainer_cls(self.net, config.train)
        tcfg = config.train
        n_layers = self.net.num_layers
        self.greedy = tcfg.layer_schedule == "greedy"
        self.epochs = tcfg.epochs * (n_layers if self.greedy else 1)
        self.samples_per_epoch = len(data.train)

    def _active(self, epoch: int) -> tuple[range, int, int]:
        """Layers that learn in ``epoch``, the epoch within its schedule and its length."""
        e = self.config.train.epochs
        if not self.greedy:
            return range(self.net.num_layers), epoch, e
        layer = epoch // e
        return range(layer, layer + 1), epoch % e, e

    def train_epoch(self, epoch: int, generator: torch.Generator, on_batch) -> dict[str, float]:
        active, local_epoch, length = self._active(epoch)
        self.net.train()

        def shown(stats: Tensor) -> dict[str, float]:
            rows = stats.tolist()  # one transfer: [loss, goodness+, goodness-] per layer
            out = {"loss": sum(r[0] for r in rows)}
            for i, (_, g_pos, g_neg) in enumerate(rows):
                out[f"g+{i}"], out[f"g-{i}"] = g_pos, g_neg
            return out

        def report(n: int, stats: Tensor) -> None:
            on_batch(n, lambda: shown(stats))

        tr = self.data.train
        stats = self.trainer.train_epoch(
            tr.x, tr.y, local_epoch, generator, active, length, on_batch=report
        )
        out = {"loss": float(stats[:, 0].sum()), "lr": self.trainer.optimizer.param_groups[0]["lr"]}
        for i, (dead, always) in enumerate(self.trainer.unit_activity()):
            out[f"dead_{i}"], out[f"always_on_{i}"] = dead, always
        for i in range(self.net.num_layers):
            out[f"loss_{i}"] = float(stats[i, 0])
            out[f"goodness_pos_{i}"] = float(stats[i, 1])
            out[f"goodness_neg_{i}"] = float(stats[i, 2])
        return out

    def epoch_evaluation(self) -> dict[str, float]:
        out: dict[str, float] = {}
        val, log_test = self.data.validation, self.config.train.log_test_error
        if not self.net.config.supervised:
            if val is not None or log_test:
                probe = self._probes(layers_alone=False)
                out.update({k: v for k, v in probe.items() if k.startswith(("val_", "test_"))})
            return out
        bs = self.config.data.eval_batch_size
        if val is not None:
            out["val_error_goodness"] = error_rate(self.net, val, "goodness", bs)
            out["val_error_softmax"] = error_rate(self.net, val, "softmax", bs)
        if log_test:
            out["test_error_goodness"] = error_rate(self.net, self.data.test, "goodness", bs)
            out["test_error_softmax"] = error_rate(self.net, self.data.test, "softmax", bs)
        return out

    def evaluate(self) -> dict[str, Any]:
        bs = self.config.data.eval_batch_size
        self.net.eval()
        if not self.net.config.supervised:
            return self._probes(layers_alone=True)
        out = {
            "test_error_goodness": error_rate(self.net, self.data.test, "goodness", bs),
            "test_error_softmax": error_rate(self.net, self.data.test, "softmax", bs),
            "train_error_goodness": error_rate(self.net, self.data.train, "goodness", bs),
        }
        if self.data.validation is not None:
            out["val_error_goodness"] = error_rate(self.net, self.data.validation, "goodness", bs)
            out["val_error_softmax"] = error_rate(self.net, self.data.validation, "softmax", bs)
        return out

    def _probes(self, layers_alone: bool) -> dict[str, Any]:
        """Train the linear probe(s) on frozen features; errors in percent.

        The probe on layers ``head_from..`` becomes the net's head. With ``layers_alone``
        also one probe per hidden layer (``test_error_probe_layers``). Randomness: a
        generator seeded with the run's seed, so the probe is the same on every evaluation of
        the same weights.
        """
        tcfg, net = self.config.train, self.net
        pcfg = ProbeConfig(tcfg.probe_epochs, tcfg.probe_lr, tcfg.probe_weight_decay)
        bs = self.config.data.eval_batch_size
        splits = {"train": self.data.train, "test": self.data.test}
        if self.data.validation is not None:
            splits["val"] = self.data.validation
        feats = {k: layer_features(net, s.x, bs) for k, s in splits.items()}
        ys = {k: s.y for k, s in splits.items()}
        head = list(range(net.config.head_from, net.num_layers))
        groups = {"probe": head}
        if layers_alone:
            groups.update({f"layer{i}": [i] for i in range(net.num_layers)})
        # every probe reads its layers' columns of one feature matrix; fitted together
        starts = [0, *itertools.accumulate(net.config.hidden)]
        columns = [
            [j for i in layers for j in range(starts[i], starts[i + 1])]
            for layers in groups.values()
        ]
        every = {k: torch.cat(f, 1) for k, f in feats.items()}  # (N, sum of widths)
        del feats
        gen = torch.Generator().manual_seed(self.config.seed)
        c = net.config.num_classes
        fitted = fit_probes(every["train"], columns, ys["train"], c, pcfg, gen)
        out: dict[str, Any] = {"probe_layers": head}
        for name, cols, (w, b) in zip(groups, columns, fitted, strict=True):
            idx = torch.as_tensor(cols, device=every["train"].device)
            errs = {k: probe_error(w, b, f.index_select(1, idx), ys[k]) for k, f in every.items()}
            if name == "probe":
                with torch.no_grad():
                    net.head.weight.copy_(w)
                    net.head.bias.copy_(b)
                for k, e in errs.items():
                    out[f"{k}_error_probe"] = e
            else:
                for k, e in errs.items():
                    out.setdefault(f"{k}_error_probe_layers", []).append(e)
        return out

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer(self.trainer.optimizer)
        tensors.update(opt_tensors)
        return tensors, {"optimizer": opt_meta}

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.net.load_state_dict(model)
        unflatten_optimizer(self.trainer.optimizer, tensors, meta["optimizer"])

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.net.parameters())


def build(config: RunConfig, data: Datasets, device: torch.device, generator) -> FFExperiment:
    return FFExperiment(config, data, device, generator)
