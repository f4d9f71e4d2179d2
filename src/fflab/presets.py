"""Presets: named, documented starting points for runs, as data.

Each preset names its algorithm and the settings that differ from the section defaults; its
``expected`` line says what result it gives and where that number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fflab.config import ConfigError, DataConfig, RunConfig, build_section, merge
from fflab.experiment import ALGORITHMS


@dataclass(frozen=True)
class Preset:
    name: str
    algorithm: str
    description: str
    expected: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


_HINTON = {"negatives": "hard", "lr_schedule": "hinton", "batch_size": 100}
# MNIST's first 10 pixels are black: the supervised presets write the label there (the
# paper's run), and their backprop twins see FF's neutral label there
_OVERLAY = {"label_mode": "overlay"}
_NEUTRAL = {"label_input": "neutral"}
# unsupervised FF: the image alone in the input, hybrid images as negatives, probe on the
# last three hidden layers
_UNSUP_MODEL = {
    "label_mode": "none",
    "image_shape": [1, 28, 28],
    "hidden": [2000, 2000, 2000, 2000],
    "head_from": 1,
}
_UNSUP_TRAIN = {"negatives": "hybrid", "blurs": 6, "lr_schedule": "hinton", "batch_size": 100}
# recurrent FF (the paper's settings, see fflab.ff.recurrent)
_RECURRENT = {"hidden": [2000, 2000], "damping": 0.3, "iterations": 8, "score_window": [3, 5]}
# Boltzmann presets: MNIST binarized once by Bernoulli sampling with a fixed seed (as in
# Salakhutdinov & Murray 2008)
_BINARY = {"binarize": "sample", "binarize_seed": 0}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "mnist-ff",
            "ff",
            "the paper's supervised FF run: 4 x 2000, 60 epochs, Hinton's optimizer settings",
            "paper: 1.36% test error (goodness scoring); fflab, 2-core CPU: 1.40%, 1.39%, 1.33% "
            "(seeds 0-2) in about an hour",
            {"model": {**_OVERLAY, "hidden": [2000] * 4}, "train": {**_HINTON, "epochs": 60}},
        ),
        Preset(
            "mnist-ff-hinton-code",
            "ff",
            "Hinton's released code: 3 x 1000, 100 epochs, hard negatives, peer normalization",
            "his code: 1.47% (another run 1.65%); fflab, 2-core CPU: 1.28-1.42% over seeds "
            "0-4 (mean 1.35%) in 20-30 min",
            {"model": {**_OVERLAY, "hidden": [1000] * 3}, "train": {**_HINTON, "epochs": 100}},
        ),
        Preset(
            "mnist-ff-quick",
            "ff",
            "Hinton's code recipe with the schedule compressed to 32 epochs (what make demo runs)",
            "about 1.4% test error (goodness scoring) in under 10 minutes on a 2-core CPU",
            {"model": {**_OVERLAY, "hidden": [1000] * 3}, "train": {**_HINTON, "epochs": 32}},
        ),
        Preset(
            "mnist-ff-recurrent",
            "ff-recurrent",
            "the paper's recurrent top-down FF run: 2 x 2000 hidden layers between the image "
            "and the label, 60 epochs, 8 synchronous iterations damped 0.3/0.7 from one "
            "bottom-up pass, hard negatives from that pass, test by goodness over iterations "
            "3-5 (all of this the paper's); fflab's choices: every iteration's loss trains, "
            "every hidden layer's goodness scores, a softmax head gives the class "
            "probabilities, Hinton's supervised optimizer settings",
            "paper: 1.31% test error; fflab: not yet measured at full length (about 5 h of "
            "training on a 2-core CPU)",
            {"model": _RECURRENT, "train": {**_HINTON, "epochs": 60}},
        ),
        Preset(
            "mnist-ff-recurrent-quick",
            "ff-recurrent",
            "the recurrent recipe at 2 x 500 and 12 epochs: what fits in about 10 minutes on a "
            "2-core CPU",
            "fflab, 2-core CPU: 2.12% test error (goodness over iterations 3-5; softmax head "
            "2.86%) in 374 s, seed 0",
            {"model": {**_RECURRENT, "hidden": [500, 500]}, "train": {**_HINTON, "epochs": 12}},
        ),
        Preset(
            "mnist-ff-unsup",
            "ff",
            "the paper's unsupervised FF run: 4 x 2000, 100 epochs, hybrid-image negatives "
            "(6 blurs), Hinton's optimizer settings; a linear softmax probe on the normalized "
            "activities of the last three hidden layers",
            "paper: 1.37% test error (probe); fflab, 2-core CPU: 1.30% (seed 0) in 67 min",
            {"model": _UNSUP_MODEL, "train": {**_UNSUP_TRAIN, "epochs": 100}},
        ),
        Preset(
            "mnist-ff-unsup-quick",
            "ff",
            "unsupervised FF in minutes: 3 x 1000 (the probe reads all three layers), 32 "
            "epochs at twice the learning rate (0.01: larger steps for the shorter "
            "schedule), otherwise as mnist-ff-unsup",
            "fflab, 2-core CPU: 1.58% test error (probe; seed 0; 1.62% seed 1) in 6-7 minutes",
            {
                "model": {**_UNSUP_MODEL, "hidden": [1000, 1000, 1000], "head_from": 0},
                "train": {**_UNSUP_TRAIN, "epochs": 32, "lr": 0.01},
            },
        ),
        Preset(
            "mnist-ff-unsup-local",
            "ff",
            "unsupervised FF with local receptive fields (no weight sharing) and peer "
            "normalization, 60 epochs (paper). Layout ours (the paper gives none for MNIST): "
            "four 14x14 maps of 12 units per location (2352 units, near the paper's 2000); "
            "layer 1 sees 7x7 pixels at stride 2, layers 2-4 5x5 locations of the map below "
            "at stride 1, so receptive fields grow 7, 15, 23, 31 pixels (the last covers the "
            "image, as the paper's CIFAR-10 nets grow theirs); probe on the last three",
            "paper: 1.16% test error (probe); fflab, 2-core CPU: 1.36%, 1.23% (seeds 0, 1) "
            "in 19-50 min",
            {
                "model": {
                    **_UNSUP_MODEL,
                    "hidden": [2352, 2352, 2352, 2352],
                    "local_kernels": [7, 5, 5, 5],
                    "local_strides": [2, 1, 1, 1],
                },
                "train": {**_UNSUP_TRAIN, "epochs": 60},
            },
        ),
        Preset(
            "mnist-bp",
            "bp",
            "the backprop twin of mnist-ff: 4 x 2000, same input and normalization, 20 epochs",
            "paper: about 1.4% test error for backprop on this kind of net in about 20 epochs",
            {"model": {**_NEUTRAL, "hidden": [2000] * 4}, "train": {"epochs": 20}},
        ),
        Preset(
            "mnist-bp-hinton-code",
            "bp",
            "the backprop twin of mnist-ff-hinton-code: 3 x 1000, 20 epochs",
            "about 1.4% test error (backprop MLPs of this size: 1.3-1.6%)",
            {"model": {**_NEUTRAL, "hidden": [1000] * 3}, "train": {"epochs": 20}},
        ),
        Preset(
            "digits-ff",
            "ff",
            "supervised FF on scikit-learn's 8 x 8 digits (no download): 2 x 300, 30 epochs, "
            "the label concatenated to the image, every layer's goodness scored",
            "fflab, 2-core CPU: 3.61, 3.06, 2.78% test error (goodness, seeds 0-2, 360 test "
            "images) after 2.5 s of training, about 10 s with start-up",
            {
                "data": {"dataset": "digits"},
                "model": {"in_features": 64, "hidden": [300, 300], "score_from": 0},
                "train": {**_HINTON, "epochs": 30},
            },
        ),
        Preset(
            "smoke",
            "ff",
            "a seconds-long FF run for tests: 2 x 100 on 2,000 MNIST images, 2 epochs",
            "76% test error by goodness scoring and 37% by the softmax head (seed 0): it checks "
            "the plumbing, not the algorithm",
            {
                "data": {"train_subset": 2000},
                "model": {**_OVERLAY, "hidden": [100, 100]},
                "train": {**_HINTON, "epochs": 2, "negatives": "random", "lr": 0.02},
            },
        ),
        Preset(
            "smoke-unsup",
            "ff",
            "a seconds-long unsupervised FF run for tests: 2 x 100 on 2,000 MNIST images, "
            "hybrid negatives, 2 epochs, a 5-epoch probe on both layers",
            "roughly 10-20% probe test error; it checks the plumbing, not the algorithm",
            {
                "data": {"train_subset": 2000},
                "model": {**_UNSUP_MODEL, "hidden": [100, 100], "head_from": 0},
                "train": {**_UNSUP_TRAIN, "epochs": 2, "lr": 0.02, "probe_epochs": 5},
            },
        ),
        Preset(
            "rbm-mnist-cd1",
            "rbm",
            "RBM, 500 hidden, CD-1, 50 epochs on stochastically binarized MNIST; AIS log Z",
            "S&M 2008: about -125.5 nats average test log-probability (AIS). fflab, H100: "
            "-121.2 nats (seeds 0, 1: -121.18, -121.08; AIS s.e. 0.07) in 19 s; "
            "--set train.lr_schedule=hinton gave -113.6; about 8 min on one CPU core",
            {"data": _BINARY, "train": {"k": 1, "epochs": 50}},
        ),
        Preset(
            "rbm-mnist-cd3",
            "rbm",
            "RBM, 500 hidden, CD-3, 50 epochs on stochastically binarized MNIST; AIS log Z",
            "S&M 2008: about -105.5 nats (AIS). fflab, H100, seed 0: -99.8 nats "
            "(AIS s.e. 0.07) in 24 s; about 13 min on one CPU core",
            {"data": _BINARY, "train": {"k": 3, "epochs": 50}},
        ),
        Preset(
            "rbm-mnist-cd25",
            "rbm",
            "RBM, 500 hidden, CD-k with k ramped linearly 1 -> 25 over the first 25 of 50 "
            "epochs (S&M increased k during learning), lr decayed over the second half",
            "S&M 2008: about -86.3 nats (AIS). fflab, H100: -85.4 nats (seeds 0, 1: "
            "-85.42, -85.72; AIS s.e. 0.11) in 69-80 s; about 50 min on one CPU core",
            {
                "data": _BINARY,
                "train": {
                    "k": 1,
                    "k_final": 25,
                    "k_ramp_epochs": 25,
                    "epochs": 50,
                    "lr_schedule": "hinton",
                },
            },
        ),
        Preset(
            "rbm-mnist-pcd",
            "rbm",
            "RBM, 500 hidden, persistent CD-1 (100 chains), lr 0.01 decayed over the second "
            "half, 50 epochs",
            "no published AIS number for this exact setting (Tieleman 2008: PCD beats CD-1). "
            "fflab, H100, seed 0: -99.7 nats (AIS s.e. 0.34) in 18 s; about 7 min on one CPU "
            "core",
            {
                "data": _BINARY,
                "train": {"persistent": True, "lr": 0.01, "lr_schedule": "hinton", "epochs": 50},
            },
        ),
        Preset(
            "rbm-mnist-h25",
            "rbm",
            "RBM, 25 hidden, CD-1, 50 epochs, lr decayed over the second half; log Z both "
            "by AIS and exactly (2**25 hidden states)",
            "S&M 2008: about -143 nats (exact). fflab, H100, seed 0: -147.9 nats exact in "
            "31 s; AIS said -145.0 (s.e. 0.27): its log Z came out 3 nats low on this peaked "
            "model (with a constant lr: -152.6 exact, AIS within 0.01); about 6 min on one "
            "CPU core, 4 of them the exact log Z",
            {
                "data": _BINARY,
                "model": {"n_hidden": 25},
                "train": {"k": 1, "epochs": 50, "lr_schedule": "hinton"},
            },
        ),
        Preset(
            "mnist-class-rbm",
            "class-rbm",
            "classification RBM (image and one-hot label, Larochelle & Bengio 2008) trained "
            "discriminatively (exact gradient of -log p(y|v)): 500 hidden, 30 epochs, "
            "classified by the free energy of each label",
            "Larochelle & Bengio 2008 (their MNIST table as public re-implementations quote "
            "it; DRBM, 500 hidden, early stopping on a validation split): 1.81% test error; "
            "fflab, 2-core CPU: 1.69% (seed 0) in about a minute",
            {"model": {"n_hidden": 500}, "train": {"objective": "discriminative"}},
        ),
        Preset(
            "mnist-class-rbm-hybrid",
            "class-rbm",
            "classification RBM, hybrid objective -log p(y|v) - 0.01 log p(v, y) (the "
            "generative part by CD-1): 1500 hidden, 30 epochs",
            "Larochelle & Bengio 2008 (their MNIST table as public re-implementations quote "
            "it; HDRBM, alpha 0.01, 1500 hidden): 1.28% test error; fflab, 2-core CPU: 1.49% "
            "(seed 0) in 7 min",
            {
                "model": {"n_hidden": 1500},
                "train": {"objective": "hybrid", "alpha": 0.01, "k": 1},
            },
        ),
        Preset(
            "mnist-class-rbm-generative",
            "class-rbm",
            "classification RBM trained generatively (CD-1 on log p(v, y)): 6000 hidden, "
            "30 epochs, lr 0.05, weight decay 2e-4",
            "Larochelle & Bengio 2008 (their MNIST table as public re-implementations quote "
            "it; generative RBM, 6000 hidden): 3.39% test error; fflab, 2-core CPU: 2.76% "
            "(seed 0) in 8 min",
            {
                "model": {"n_hidden": 6000},
                "train": {"objective": "generative", "lr": 0.05, "weight_decay": 2e-4},
            },
        ),
        Preset(
            "digits-class-rbm",
            "class-rbm",
            "discriminative classification RBM on scikit-learn's 8 x 8 digits (no download): "
            "100 hidden, 30 epochs",
            "fflab, 2-core CPU: 1.39, 1.67, 1.94% test error (free-energy scoring, seeds 0-2, "
            "360 test images) after about 4 s of training",
            {
                "data": {"dataset": "digits"},
                "model": {"n_visible": 64, "n_hidden": 100},
                "train": {"objective": "discriminative", "epochs": 30},
            },
        ),
        Preset(
            "bm-tiny",
            "bm",
            "general BM with lateral connections: 16 visible (MNIST's central 20x20 pooled "
            "to 4x4, > 0.3) + 4 hidden, persistent chains, 10,000 images, exact evaluation",
            "exact test log-likelihood -7.53 nats (H100, seed 0, 4 s); the uniform model "
            "gives -11.09 and the independent-pixel start about -8.6",
            {"data": {"train_subset": 10000}, "train": {"epochs": 10}},
        ),
        Preset(
            "rbm-smoke",
            "rbm",
            "a seconds-long RBM run for tests: 10 hidden, CD-1, 1,000 images, 2 epochs, "
            "short AIS plus exact log Z",
            "checks the plumbing: AIS log Z within its error bar of the exact one",
            {
                "data": {**_BINARY, "train_subset": 1000},
                "model": {"n_hidden": 10},
                "train": {"epochs": 2, "ais_betas": 1000},
            },
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; run 'fflab presets' to list them")
    return PRESETS[name]


def resolve(
    preset: str, overrides: dict[str, dict[str, Any]] | None = None, seed: int = 0
) -> RunConfig:
    """Build the run config of ``preset`` with ``overrides`` applied on top."""
    p = get_preset(preset)
    algo = ALGORITHMS[p.algorithm]
    settings = merge(p.settings, overrides or {})
    return RunConfig(
        preset=p.name,
        algorithm=p.algorithm,
        seed=seed,
        data=build_section(DataConfig, settings.get("data", {}), "data"),
        model=build_section(algo.model_cls(), settings.get("model", {}), "model"),
        train=build_section(algo.train_cls(), settings.get("train", {}), "train"),
    )


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a resolved config (``config.json`` of a run directory)."""
    if d.get("algorithm") not in ALGORITHMS:
        raise ConfigError(f"config names unknown algorithm {d.get('algorithm')!r}")
    algo = ALGORITHMS[d["algorithm"]]
    return RunConfig(
        preset=d["preset"],
        algorithm=d["algorithm"],
        seed=int(d["seed"]),
        data=build_section(DataConfig, d["data"], "data"),
        model=build_section(algo.model_cls(), d["model"], "model"),
        train=build_section(algo.train_cls(), d["train"], "train"),
    )
