"""Forward-Forward estimators: a classifier (:class:`FFClassifier`) and a feature
transformer (:class:`FFFeatures`), both trained by fflab's :class:`fflab.ff.train.FFTrainer`.

Shapes: ``N`` samples, ``D`` features, ``C`` classes, ``H_l`` units of hidden layer ``l``.

Input scaling. An FF net RMS-normalizes the input of every layer, the first included: each
row ``[label; x]`` (the classifier writes the one-hot label in front of the features) is
divided by its root mean square. So the overall scale of a row does not matter, but the
relative scale of the features does, and so does their size against the one-hot label,
whose squared norm is 1: features of typical magnitude around 1 (``MinMaxScaler`` to [0, 1]
or ``StandardScaler``) keep the label visible. The estimators do not rescale the features
themselves; put a scaler in front of them in a ``Pipeline``.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassifierMixin,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from fflab.ff.functional import rms_normalize
from fflab.ff.model import FFNet, FFNetConfig
from fflab.ff.train import FFTrainConfig, FFTrainer

from ._common import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_real,
    out_dtype,
    to_numpy,
    to_tensor,
    torch_generator,
)

__all__ = ["FFClassifier", "FFFeatures"]

INFERENCE = ("goodness", "softmax")
EVAL_ROWS = 1024  # rows per inference chunk (goodness scoring runs C passes of each)


class _FFBase(BaseEstimator):
    """What both FF estimators share: settings to configs, the epoch loop, pickling.

    Fitted state: ``net_`` (the :class:`~fflab.ff.model.FFNet`), ``n_iter_`` (epochs
    trained), ``loss_curve_`` (each epoch's mean FF loss summed over layers); private: the
    trainer (optimizer, negative source) and the torch generator that every epoch draws from.
    """

    def _train_config(self, negatives: str, **extra) -> FFTrainConfig:
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_real(self.lr, "lr", 0.0, open_low=True)
        check_real(self.momentum, "momentum", 0.0, 1.0)
        check_real(self.weight_cost, "weight_cost", 0.0)
        return FFTrainConfig(
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            optimizer=self.optimizer,
            lr=float(self.lr),
            momentum=float(self.momentum),
            weight_cost=float(self.weight_cost),
            lr_schedule=self.lr_schedule,
            negatives=negatives,
            input_dropout=float(self.input_dropout),
            dropout=float(self.dropout),
            **extra,
        )

    def _hidden(self) -> tuple[int, ...]:
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, int | np.integer):
            sizes = (sizes,)
        sizes = tuple(sizes)
        if not sizes:
            raise ValueError("hidden_layer_sizes must name at least one layer")
        return tuple(check_int(h, "hidden_layer_sizes entries", 1) for h in sizes)

    def _net_config(self, **fields) -> FFNetConfig:
        hidden = self._hidden()
        return FFNetConfig(
            hidden=hidden,
            goodness=self.goodness,
            threshold=None if self.threshold is None else float(self.threshold),
            peer_norm=float(self.peer_norm),
            **fields,
        )

    def _start(self, net_config: FFNetConfig, train_config: FFTrainConfig) -> None:
        """A fresh net (weights from the seeded generator) and its trainer."""
        self._generator = torch_generator(self.random_state)
        self.net_ = FFNet(net_config, generator=self._generator)
        self._train_config_ = train_config
        self._trainer = FFTrainer(self.net_, train_config)
        self.n_iter_ = 0
        self.loss_curve_ = []

    def _net_for(self, dtype) -> FFNet:
        """The fitted net in the torch dtype matching numpy ``dtype`` (float64: a copy)."""
        if dtype == np.float64:
            return copy.deepcopy(self.net_).to(torch.float64)
        return self.net_

    def _epoch(self, x: Tensor, y: Tensor) -> None:
        """One epoch of fflab's FF step over x (N, D) float32 and labels y (N,) int64.

        The learning-rate schedule is that of ``epochs`` epochs; epochs past it keep its last
        factor.
        """
        cfg = self._train_config_
        start = time.perf_counter()
        epoch = min(self.n_iter_, cfg.epochs - 1)
        stats = self._trainer.train_epoch(x, y, epoch, self._generator)
        self.n_iter_ += 1
        self.loss_curve_.append(float(stats[:, 0].sum()))
        if self.verbose:
            secs = time.perf_counter() - start
            print(
                f"{type(self).__name__} epoch {self.n_iter_}: FF loss {self.loss_curve_[-1]:.4f}"
                f" ({secs:.2f} s)"
            )

    def __getstate__(self):
        state = dict(super().__getstate__())
        trainer = state.pop("_trainer", None)
        if trainer is not None:  # the optimizer caches parameter ids: rebuilt on load
            state["_optimizer_state"] = trainer.optimizer.state_dict()
        return state

    def __setstate__(self, state):
        state = dict(state)
        saved = state.pop("_optimizer_state", None)
        super().__setstate__(state)
        if saved is not None:
            self._trainer = FFTrainer(self.net_, self._train_config_)
            self._trainer.optimizer.load_state_dict(saved)


class FFClassifier(ClassifierMixin, _FFBase):
    """Forward-Forward classifier: the label is part of the input, negatives are wrong labels.

    The net is an :class:`fflab.ff.model.FFNet` with ``label_mode="concat"`` (the one-hot
    label is written in front of the features, so it suits any data), trained by fflab's
    :class:`~fflab.ff.train.FFTrainer`: positive rows carry the true label, negative rows a
    wrong one (``negatives``), and a softmax head learns alongside from a neutral-label pass.
    Labels of any type are mapped to 0..C-1 through the sorted ``classes_``. See
    :mod:`fflab.sklearn.ff` for how inputs are scaled (they are not standardized).

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(500, 500)
        Units of each hidden layer.
    inference : {"goodness", "softmax"}, default="goodness"
        How ``predict`` and ``predict_proba`` score a row: ``goodness`` runs the row once with
        every candidate label and takes a softmax over the labels' summed goodness (layers
        ``score_from..``); ``softmax`` reads the softmax head after one neutral-label pass.
        Read at prediction time, so it can be changed on a fitted model.
    epochs : int, default=60
        Epochs of ``fit``, and the length of the learning-rate schedule.
    batch_size : int, default=100
    lr : float, default=0.02
        Learning rate of the FF layers (FFTrainConfig.lr).
    momentum : float, default=0.9
        Gradient smoothing of the SGD optimizer.
    optimizer : {"sgd", "adam"}, default="sgd"
    weight_cost : float, default=0.002
        L2 decay of the FF weights per step (``p -= lr * weight_cost * p``).
    head_lr : float, default=0.1
    head_weight_cost : float, default=0.003
        Learning rate and L2 decay of the softmax head.
    lr_schedule : {"hinton", "constant"}, default="hinton"
        ``hinton``: constant for half the epochs, then falling linearly to lr / epochs.
    negatives : {"hard", "random"}, default="hard"
        Wrong labels drawn from the softmax head's confusions, or uniformly.
    goodness : {"sumsq", "meansq", "minssq"}, default="sumsq"
    threshold : float or None, default=None
        Goodness threshold; None: the layer's width (sumsq, minssq) or 1 (meansq).
    peer_norm : float, default=0.06
        Peer-normalization strength (0: off).
    score_from, head_from : int or None, default=None
        First hidden layer whose goodness is scored / whose activities the head reads;
        None: 1 with two or more hidden layers (the first layer is skipped), else 0.
    input_dropout, dropout : float, default=0.0
        Dropout on the features and on the inputs of layers 2.. while training.
    random_state : int, RandomState instance or None, default=None
        Seeds the torch generator behind the initial weights, minibatch orders and
        negatives; with an int, ``fit`` is reproducible.
    verbose : int, default=0
        Print each epoch's FF loss.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    net_ : fflab.ff.model.FFNet
    n_iter_ : int
        Epochs trained (``fit`` and ``partial_fit`` calls together).
    loss_curve_ : list of float
        Each epoch's mean FF loss, summed over the layers.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined when ``X`` has string feature names.
    """

    def __init__(
        self,
        hidden_layer_sizes=(500, 500),
        *,
        inference="goodness",
        epochs=60,
        batch_size=100,
        lr=0.02,
        momentum=0.9,
        optimizer="sgd",
        weight_cost=0.002,
        head_lr=0.1,
        head_weight_cost=0.003,
        lr_schedule="hinton",
        negatives="hard",
        goodness="sumsq",
        threshold=None,
        peer_norm=0.06,
        score_from=None,
        head_from=None,
        input_dropout=0.0,
        dropout=0.0,
        random_state=None,
        verbose=0,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.inference = inference
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.optimizer = optimizer
        self.weight_cost = weight_cost
        self.head_lr = head_lr
        self.head_weight_cost = head_weight_cost
        self.lr_schedule = lr_schedule
        self.negatives = negatives
        self.goodness = goodness
        self.threshold = threshold
        self.peer_norm = peer_norm
        self.score_from = score_from
        self.head_from = head_from
        self.input_dropout = input_dropout
        self.dropout = dropout
        self.random_state = random_state
        self.verbose = verbose

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, y):
        """Train a fresh net on X (N, D) and labels y (N,) for ``epochs`` epochs."""
        X, y = validate_data(self, X, y, dtype=FLOAT_DTYPES, reset=True)
        check_classification_targets(y)
        classes, codes = np.unique(y, return_inverse=True)
        self._begin(classes, X.shape[1])
        x, t = to_tensor(X), torch.from_numpy(codes.astype(np.int64))
        for _ in range(self.epochs):
            self._epoch(x, t)
        return self

    def partial_fit(self, X, y, classes=None):
        """One epoch on X (N, D), y (N,); the first call needs ``classes`` (all labels).

        ``epochs`` calls on the same data (same ``random_state``) give the model of ``fit``;
        later calls keep the schedule's last learning rate. The settings are those of the
        first call.
        """
        first = not hasattr(self, "classes_")
        X, y = validate_data(self, X, y, dtype=FLOAT_DTYPES, reset=first)
        check_classification_targets(y)
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            self._begin(np.unique(np.asarray(classes)), X.shape[1])
        elif classes is not None and not np.array_equal(self.classes_, np.unique(classes)):
            raise ValueError(
                f"classes={np.unique(classes)!r} differs from {self.classes_!r} of the first call"
            )
        self._epoch(to_tensor(X), torch.from_numpy(self._codes(y)))
        return self

    def _begin(self, classes: np.ndarray, n_features: int) -> None:
        if len(classes) < 2:
            raise ValueError(
                f"FFClassifier needs at least 2 classes in y, got {len(classes)} class"
            )
        check_choice(self.inference, "inference", INFERENCE)
        n_layers = len(self._hidden())
        auto = min(1, n_layers - 1)
        net_config = self._net_config(
            in_features=n_features,
            num_classes=len(classes),
            label_mode="concat",
            score_from=auto if self.score_from is None else self.score_from,
            head_from=auto if self.head_from is None else self.head_from,
        )
        check_real(self.head_lr, "head_lr", 0.0, open_low=True)
        check_real(self.head_weight_cost, "head_weight_cost", 0.0)
        train_config = self._train_config(
            check_choice(self.negatives, "negatives", ("hard", "random")),
            head_lr=float(self.head_lr),
            head_weight_cost=float(self.head_weight_cost),
        )
        self.classes_ = classes
        self._start(net_config, train_config)

    def _codes(self, y: np.ndarray) -> np.ndarray:
        """Labels y (N,) -> their indices in ``classes_`` (N,) int64; unknown labels refused."""
        codes = np.searchsorted(self.classes_, y)
        codes = np.clip(codes, 0, len(self.classes_) - 1)
        if not np.array_equal(self.classes_[codes], y):
            unknown = np.setdiff1d(y, self.classes_)
            raise ValueError(f"y holds labels not in classes_: {unknown[:5]!r}")
        return codes.astype(np.int64)

    # -- prediction ------------------------------------------------------------------------
    def _logits(self, X) -> np.ndarray:
        """Per-class scores of X (N, D) -> (N, C) float64: summed goodness or head logits."""
        check_is_fitted(self)
        mode = check_choice(self.inference, "inference", INFERENCE)
        X = validate_data(self, X, dtype=FLOAT_DTYPES, reset=False)
        dtype = out_dtype(X)
        x, net = to_tensor(X, dtype), self._net_for(dtype)
        score = net.label_scores if mode == "goodness" else net.head_logits
        with torch.no_grad():
            parts = [score(chunk) for chunk in x.split(EVAL_ROWS)]
        return torch.cat(parts).double().numpy()

    def predict_proba(self, X):
        """Class probabilities (N, C) float64, columns in the order of ``classes_``."""
        z = self._logits(X)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X):
        """The most probable class of each row (N,), an element of ``classes_``."""
        z = self._logits(X)
        return self.classes_[np.argmax(z, axis=1)]


class FFFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, _FFBase):
    """Unsupervised Forward-Forward features: positives are the rows, negatives hybrids.

    An :class:`fflab.ff.model.FFNet` with ``label_mode="none"`` trained by fflab's FF step on
    hybrid negatives (:class:`fflab.negatives.HybridImages`: two rows of a minibatch mixed
    region by region under a blurred random mask), so it needs to know how a row forms an
    image: ``image_shape`` is required. ``transform`` returns the RMS-normalized activities of
    the chosen hidden layers (what fflab's linear probes read). No labels are used; ``y`` is
    ignored. See :mod:`fflab.sklearn.ff` for how inputs are scaled.

    Parameters
    ----------
    image_shape : tuple of int
        ``(height, width)`` or ``(1, height, width)`` of each row (row-major); one entry may
        be -1, inferred from the number of features as in ``numpy.reshape``. ``(1, -1)``
        treats the features as a 1-D signal: the negatives then splice runs of neighbouring
        features of two rows, which suits data whose neighbouring features are related.
    hidden_layer_sizes : tuple of int, default=(500, 500, 500)
    layers : tuple of int or None, default=None
        Hidden layers (0-based) whose activities ``transform`` returns, concatenated; None:
        every layer but the first when there are two or more (fflab's probe default).
    epochs : int, default=30
    batch_size : int, default=100
    lr : float, default=0.02
    momentum : float, default=0.9
    optimizer : {"sgd", "adam"}, default="sgd"
    weight_cost : float, default=0.002
    lr_schedule : {"hinton", "constant"}, default="hinton"
    blurs : int, default=6
        Passes of the [1/4, 1/2, 1/4] blur that shape the hybrid masks.
    goodness, threshold, peer_norm, input_dropout, dropout, random_state, verbose
        As for :class:`FFClassifier`.

    Attributes
    ----------
    net_ : fflab.ff.model.FFNet
    n_iter_ : int
    loss_curve_ : list of float
    image_shape_ : tuple of int
        ``(1, height, width)`` as resolved for the training data.
    n_features_in_ : int
    """

    def __init__(
        self,
        image_shape=None,
        *,
        hidden_layer_sizes=(500, 500, 500),
        layers=None,
        epochs=30,
        batch_size=100,
        lr=0.02,
        momentum=0.9,
        optimizer="sgd",
        weight_cost=0.002,
        lr_schedule="hinton",
        blurs=6,
        goodness="sumsq",
        threshold=None,
        peer_norm=0.06,
        input_dropout=0.0,
        dropout=0.0,
        random_state=None,
        verbose=0,
    ):
        self.image_shape = image_shape
        self.hidden_layer_sizes = hidden_layer_sizes
        self.layers = layers
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.optimizer = optimizer
        self.weight_cost = weight_cost
        self.lr_schedule = lr_schedule
        self.blurs = blurs
        self.goodness = goodness
        self.threshold = threshold
        self.peer_norm = peer_norm
        self.input_dropout = input_dropout
        self.dropout = dropout
        self.random_state = random_state
        self.verbose = verbose

    def _resolve_shape(self, n_features: int) -> tuple[int, int, int]:
        if self.image_shape is None:
            raise ValueError(
                "FFFeatures needs image_shape, (height, width) of each row, for its hybrid "
                "negatives; (1, -1) treats the features as a 1-D signal"
            )
        shape = tuple(int(s) for s in self.image_shape)
        if len(shape) == 3:
            if shape[0] != 1:
                raise ValueError(f"image_shape must have one channel, got {shape}")
            shape = shape[1:]
        if len(shape) != 2 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
            raise ValueError(
                f"image_shape must be (height, width) or (1, height, width), at most one "
                f"entry -1, got {self.image_shape!r}"
            )
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if n_features % known:
                raise ValueError(
                    f"image_shape {self.image_shape!r} cannot hold {n_features} features"
                )
            shape = tuple(n_features // known if s == -1 else s for s in shape)
        if math.prod(shape) != n_features:
            raise ValueError(
                f"image_shape {self.image_shape!r} holds {math.prod(shape)} values, X has "
                f"{n_features} features"
            )
        return (1, *shape)

    def _layers(self) -> list[int]:
        n = self.net_.num_layers
        if self.layers is None:
            return list(range(min(1, n - 1), n))
        chosen = [int(i) for i in np.atleast_1d(self.layers)]
        if not chosen or any(not 0 <= i < n for i in chosen):
            raise ValueError(f"layers must name hidden layers in 0..{n - 1}, got {self.layers!r}")
        return chosen

    @property
    def _n_features_out(self) -> int:  # read by get_feature_names_out
        return sum(self.net_.config.hidden[i] for i in self._layers())

    def fit(self, X, y=None):
        """Train a fresh net on X (N, D) for ``epochs`` epochs; y is ignored."""
        X = validate_data(self, X, dtype=FLOAT_DTYPES, reset=True)
        shape = self._resolve_shape(X.shape[1])
        auto = min(1, len(self._hidden()) - 1)  # the probe's default: skip layer 0 if deeper
        net_config = self._net_config(
            in_features=X.shape[1],
            label_mode="none",
            image_shape=shape,
            num_classes=2,  # the head is unused: transform reads the layers
            score_from=auto,
            head_from=auto,
        )
        train_config = self._train_config("hybrid", blurs=check_int(self.blurs, "blurs", 0))
        self.image_shape_ = shape
        self._start(net_config, train_config)
        x = to_tensor(X)
        no_labels = torch.zeros(x.shape[0], dtype=torch.int64)  # hybrids ignore labels
        for _ in range(self.epochs):
            self._epoch(x, no_labels)
        return self

    def transform(self, X):
        """RMS-normalized activities of ``layers``: X (N, D) -> (N, sum of their widths)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=FLOAT_DTYPES, reset=False)
        chosen = self._layers()
        dtype = out_dtype(X)
        x, net = to_tensor(X, dtype), self._net_for(dtype)
        parts = []
        with torch.no_grad():
            for chunk in x.split(EVAL_ROWS):
                acts = net.activities(chunk)
                parts.append(torch.cat([rms_normalize(acts[i]) for i in chosen], 1))
        return to_numpy(torch.cat(parts), dtype)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
