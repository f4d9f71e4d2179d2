"""A Bernoulli RBM estimator with the interface of ``sklearn.neural_network.BernoulliRBM``.

Shapes: ``N`` samples, ``V`` features (visible units), ``H`` = ``n_components`` (hidden
units), ``C`` = ``batch_size`` persistent chains.

The model is a :class:`fflab.boltzmann.RBM`; each minibatch update is fflab's fused CD/PCD
step :func:`fflab.boltzmann.cd_gradient`. With ``momentum`` or ``weight_decay`` the update
is :func:`fflab.boltzmann.rbm_optimizer`'s momentum ascent, exactly as
:func:`fflab.boltzmann.rbm_train_epoch` applies it (the tests hold the two equal); without
them (the default, BernoulliRBM's algorithm) the step ``p += learning_rate * grad`` is
applied in place, which saves the optimizer's per-batch overhead on small models.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from fflab.boltzmann import (
    RBM as TorchRBM,
)
from fflab.boltzmann import (
    ais_log_z,
    cd_gradient,
    exact_log_z,
    free_energy,
    hidden_probs,
    make_base_rate_visible_bias,
    rbm_optimizer,
)

from ._common import (
    FLOAT_DTYPES,
    check_int,
    check_real,
    out_dtype,
    to_numpy,
    to_tensor,
    torch_generator,
)

__all__ = ["RBM"]

LOG_PROB_METHODS = ("exact", "ais")


def _check_unit_interval(X: np.ndarray, what: str) -> None:
    if X.size and (X.min() < 0 or X.max() > 1):
        raise ValueError(
            f"{what} must have every value in [0, 1] (Bernoulli visible units); scale it "
            "first, e.g. with sklearn.preprocessing.MinMaxScaler"
        )


def _check_binary(X: np.ndarray, what: str) -> None:
    if not np.all((X == 0) | (X == 1)):
        raise ValueError(f"{what} must be binary (every value 0 or 1)")


class RBM(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Bernoulli-Bernoulli restricted Boltzmann machine trained by PCD-k or CD-k.

    A replacement for ``sklearn.neural_network.BernoulliRBM``: the first six parameters mean
    what they mean there, and the defaults give its algorithm, PCD-1 (persistent
    contrastive divergence, "stochastic maximum likelihood") with ``batch_size`` chains
    started from all-zero hidden states, plain SGD on the mean gradient of each minibatch
    (no momentum, no weight decay), weights drawn from N(0, 0.01^2), biases zero.
    ``persistent=True`` is the default for that reason: code written for BernoulliRBM gets
    the same estimator of the gradient. Set ``persistent=False`` for CD-k.

    Differences from BernoulliRBM: values of ``X`` must lie in [0, 1] (they are the
    probabilities of the binary visible units; anything else raises ValueError); sparse
    input is refused; the minibatches are drawn in a fresh random order every epoch
    (``shuffle=False``: in row order); ``partial_fit`` makes one pass over its data in
    minibatches of ``batch_size`` (BernoulliRBM takes its whole input as one minibatch; the
    two agree when a call holds at most ``batch_size`` rows); ``gibbs`` returns floats.
    The computation runs in float32 (fflab's model dtype); see :mod:`fflab.sklearn`.

    Parameters
    ----------
    n_components : int, default=256
        Number of binary hidden units H.
    learning_rate : float, default=0.1
        Step size on the minibatch-mean log-likelihood gradient.
    batch_size : int, default=10
        Rows per minibatch, and the number of persistent chains.
    n_iter : int, default=10
        Epochs (passes over the training data) of ``fit``.
    verbose : int, default=0
        Print the pseudo-log-likelihood of the training data and the time after each epoch.
    random_state : int, RandomState instance or None, default=None
        Seeds the torch generator behind the initial weights, the minibatch order and every
        Gibbs sample; with an int, ``fit`` is reproducible. ``score_samples`` and
        ``log_prob`` draw from a fresh generator of it on every call.
    k : int, default=1
        Gibbs steps per update (CD-k or PCD-k).
    persistent : bool, default=True
        PCD (chains carried across minibatches, epochs and ``partial_fit`` calls) or CD
        (each negative chain starts at a hidden sample of its data row).
    momentum : float, default=0.0
        Momentum of the velocity ``v = momentum * v + learning_rate * (grad - weight_decay *
        W)``, ``p += v`` (Hinton's practical guide, :func:`fflab.boltzmann.rbm_optimizer`).
    weight_decay : float, default=0.0
        L2 weight decay on the weights (not the biases).
    shuffle : bool, default=True
        Draw the minibatches in a new random order every epoch.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features), float32
        Weights (a view of the model's: writing into it changes the model).
    intercept_hidden_ : ndarray of shape (n_components,)
    intercept_visible_ : ndarray of shape (n_features,)
    h_samples_ : ndarray of shape (batch_size, n_components)
        Hidden states of the persistent chains (zeros before the first update and for CD).
    rbm_ : fflab.boltzmann.RBM
        The torch model itself (``W`` is ``components_.T``).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined when ``X`` has string feature names.
    """

    def __init__(
        self,
        n_components=256,
        *,
        learning_rate=0.1,
        batch_size=10,
        n_iter=10,
        verbose=0,
        random_state=None,
        k=1,
        persistent=True,
        momentum=0.0,
        weight_decay=0.0,
        shuffle=True,
    ):
        self.n_components = n_components
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.verbose = verbose
        self.random_state = random_state
        self.k = k
        self.persistent = persistent
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.shuffle = shuffle

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Fit a fresh model to X (N, V) with values in [0, 1] for ``n_iter`` epochs."""
        X = self._check_train(X, reset=True)
        check_int(self.n_iter, "n_iter", 0)
        self._start(X.shape[1])
        x = to_tensor(X)
        self._see(x)
        for _ in range(self.n_iter):
            self._epoch(x)
        return self

    def partial_fit(self, X, y=None):
        """One epoch over X (N, V) in minibatches of ``batch_size``; starts a model if none.

        ``n_iter`` calls on the same X (same ``random_state``) give the model of ``fit``.
        """
        first = not hasattr(self, "rbm_")
        X = self._check_train(X, reset=first)
        if first:
            self._start(X.shape[1])
        x = to_tensor(X)
        self._see(x)
        self._epoch(x)
        return self

    def _check_train(self, X, reset: bool) -> np.ndarray:
        check_int(self.n_components, "n_components", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.k, "k", 1)
        check_real(self.learning_rate, "learning_rate", 0.0, open_low=True)
        check_real(self.momentum, "momentum", 0.0, 1.0)
        check_real(self.weight_decay, "weight_decay", 0.0)
        if not isinstance(self.persistent, bool | np.bool_):
            raise ValueError(f"persistent must be True or False, got {self.persistent!r}")
        X = validate_data(self, X, dtype=FLOAT_DTYPES, reset=reset)
        _check_unit_interval(X, "X")
        return X

    def _start(self, n_features: int) -> None:
        """A fresh model: weights from the seeded generator, chains at h = 0."""
        self._generator = torch_generator(self.random_state)
        self.rbm_ = TorchRBM(n_features, self.n_components, generator=self._generator)
        self.rbm_.persistent_h = torch.zeros(self.batch_size, self.n_components)
        self.rbm_.persistent_v = torch.zeros(self.batch_size, n_features)
        self._optimizer = None
        self._visible_sum = torch.zeros(n_features, dtype=torch.float64)
        self._rows_seen = 0
        self._epochs_done = 0
        self._n_features_out = self.n_components

    def _see(self, x: Tensor) -> None:
        """Accumulate the per-feature sums of the training data (AIS's base-rate model)."""
        self._visible_sum += x.sum(0, dtype=torch.float64)
        self._rows_seen += x.shape[0]

    def _update_rule(self):
        """None for plain SGD, else fflab's MomentumSGD with this estimator's settings."""
        if self.momentum == 0 and self.weight_decay == 0:
            return None
        if self._optimizer is None:
            self._optimizer = rbm_optimizer(
                self.rbm_, lr=self.learning_rate, momentum=self.momentum, weight_decay=0.0
            )
        for group in self._optimizer.param_groups:  # the current settings, as set_params left
            group["lr"], group["momentum"] = float(self.learning_rate), float(self.momentum)
        self._optimizer.param_groups[0]["weight_decay"] = float(self.weight_decay)
        return self._optimizer

    def _epoch(self, data: Tensor) -> None:
        """One pass over data (N, V) float32: fflab's CD/PCD step on every minibatch."""
        rbm, g, bs = self.rbm_, self._generator, self.batch_size
        persistent, k, lr = bool(self.persistent), self.k, float(self.learning_rate)
        if persistent and rbm.persistent_h.shape[0] != bs:  # batch_size changed by set_params
            rbm.persistent_h = torch.zeros(bs, self.n_components)
            rbm.persistent_v = torch.zeros(bs, data.shape[1])
        optimizer = self._update_rule()
        start = time.perf_counter()
        W, b_v, b_h = rbm.W, rbm.b_v, rbm.b_h
        # the chains live in locals during the epoch (a module attribute costs microseconds)
        v_chain, h_chain = rbm.persistent_v, rbm.persistent_h
        # plain SGD touches only model tensors, so it may run in inference mode (less
        # per-op overhead); the optimizer creates its velocities lazily, so it does not
        mode = torch.inference_mode() if optimizer is None else torch.no_grad()
        with mode:
            x = data[torch.randperm(data.shape[0], generator=g)] if self.shuffle else data
            for v in x.split(bs):  # (B, V) views of one gathered copy
                result = cd_gradient(
                    v,
                    W,
                    b_v,
                    b_h,
                    k=k,
                    generator=g,
                    h_chain=h_chain if persistent else None,
                    with_free_energy=False,
                    weight_grad=False,
                )
                if persistent:
                    v_chain, h_chain = result.v_negative, result.h_negative
                if optimizer is None:
                    W.addmm_(*result.weight_factors, alpha=lr)
                    b_v.add_(result.grads["b_v"], alpha=lr)
                    b_h.add_(result.grads["b_h"], alpha=lr)
                else:
                    optimizer.fold_product_(W, *result.weight_factors)
                    optimizer.fold_(b_v, result.grads["b_v"])
                    optimizer.fold_(b_h, result.grads["b_h"])
                    optimizer.step()
        # chains made in inference mode become ordinary tensors again
        rbm.persistent_v, rbm.persistent_h = v_chain.clone(), h_chain.clone()
        self._epochs_done += 1
        if self.verbose:
            pll = float(np.mean(self.score_samples(data.numpy())))
            secs = time.perf_counter() - start
            print(f"RBM epoch {self._epochs_done}: pseudo-log-likelihood {pll:.2f} ({secs:.2f} s)")

    # -- attributes of BernoulliRBM ---------------------------------------------------------
    def _model(self) -> TorchRBM:
        if "rbm_" not in self.__dict__:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit")
        return self.rbm_

    @property
    def components_(self) -> np.ndarray:
        return self._model().W.detach().numpy().T

    @components_.setter
    def components_(self, value) -> None:
        self._set(self._model().W, np.asarray(value).T, "components_")

    @property
    def intercept_hidden_(self) -> np.ndarray:
        return self._model().b_h.detach().numpy()

    @intercept_hidden_.setter
    def intercept_hidden_(self, value) -> None:
        self._set(self._model().b_h, np.asarray(value), "intercept_hidden_")

    @property
    def intercept_visible_(self) -> np.ndarray:
        return self._model().b_v.detach().numpy()

    @intercept_visible_.setter
    def intercept_visible_(self, value) -> None:
        self._set(self._model().b_v, np.asarray(value), "intercept_visible_")

    @property
    def h_samples_(self) -> np.ndarray:
        return self._model().persistent_h.numpy()

    @staticmethod
    def _set(param: Tensor, value: np.ndarray, name: str) -> None:
        """Copy ``value`` (already in the model's layout) into ``param``."""
        if value.shape != tuple(param.shape):
            flip = (lambda s: s[::-1]) if name == "components_" else (lambda s: s)
            want, got = flip(tuple(param.shape)), flip(value.shape)
            raise ValueError(f"{name} must have shape {want}, got {got}")
        with torch.no_grad():
            param.copy_(torch.as_tensor(np.ascontiguousarray(value), dtype=param.dtype))

    # -- using the model --------------------------------------------------------------------
    def _input(self, X) -> tuple[np.ndarray, Tensor]:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=FLOAT_DTYPES, reset=False)
        return X, to_tensor(X)

    def transform(self, X):
        """Hidden probabilities p(h = 1 | v) of X (N, V) -> (N, H), in X's float dtype.

        Computed in that dtype (float64: with the weights cast up).
        """
        X, _ = self._input(X)
        dtype = out_dtype(X)
        x, rbm = to_tensor(X, dtype), self.rbm_
        to = getattr(torch, np.dtype(dtype).name)
        with torch.no_grad():
            p = hidden_probs(x, rbm.W.to(to), rbm.b_h.to(to))
        return to_numpy(p, dtype)

    def gibbs(self, v):
        """One block Gibbs step v -> h ~ p(h | v) -> v' ~ p(v | h): (N, V) -> (N, V) of 0/1.

        Draws from the estimator's generator (the one training uses), in v's float dtype.
        """
        v, x = self._input(v)
        return to_numpy(self.rbm_.gibbs(x, 1, generator=self._generator), out_dtype(v))

    def _free_energy64(self, v: np.ndarray) -> np.ndarray:
        """F(v) in float64 for rows v (N, V) -> (N,)."""
        p = {name: t.detach().double() for name, t in self.rbm_.named_parameters()}
        return free_energy(torch.from_numpy(v), p["W"], p["b_v"], p["b_h"]).numpy()

    def score_samples(self, X):
        """Pseudo-log-likelihood of each row of X (N, V) -> (N,) float64, as BernoulliRBM's.

        ``V * log sigmoid(F(v~) - F(v))`` with ``v~`` the row with one feature flipped
        (``x -> 1 - x``), the feature drawn uniformly by ``check_random_state(random_state)``
        (with an int ``random_state``, the features BernoulliRBM would flip). A noisy proxy
        of the log-likelihood; :meth:`log_prob` gives the log-likelihood itself.
        """
        X, _ = self._input(X)
        v = X.astype(np.float64)
        rng = check_random_state(self.random_state)
        rows, cols = np.arange(v.shape[0]), rng.randint(0, v.shape[1], v.shape[0])
        flipped = v.copy()
        flipped[rows, cols] = 1.0 - flipped[rows, cols]
        diff = torch.from_numpy(self._free_energy64(flipped) - self._free_energy64(v))
        return (-v.shape[1] * F.softplus(-diff)).numpy()

    def log_partition(self, method="exact", *, n_chains=100, n_betas=14500):
        """log Z and its standard error: ``(log_z, std_error)``.

        ``method="exact"``: enumeration of the smaller layer's 2**min(V, H) states
        (:func:`fflab.boltzmann.exact_log_z`, at most 24 units there); the error is 0.
        ``"ais"``: annealed importance sampling (:func:`fflab.boltzmann.ais_log_z`) with
        ``n_chains`` chains and ``n_betas`` inverse temperatures from the base-rate model of
        the training data, drawn from a fresh generator of ``random_state``; its log is
        biased low by about std_error**2 / 2.
        """
        rbm = self._model()
        if method == "exact":
            return float(exact_log_z(rbm).detach()), 0.0
        if method == "ais":
            check_int(n_chains, "n_chains", 2)
            check_int(n_betas, "n_betas", 3)
            mean = (self._visible_sum / max(self._rows_seen, 1)).unsqueeze(0)  # (1, V)
            base = make_base_rate_visible_bias(mean)
            result = ais_log_z(
                rbm,
                n_chains,
                n_betas,
                generator=torch_generator(self.random_state),
                base_visible_bias=base,
            )
            return result.log_z, result.std_error
        raise ValueError(f"method must be one of {', '.join(LOG_PROB_METHODS)}, got {method!r}")

    def log_prob(self, X, method="exact", *, n_chains=100, n_betas=14500):
        """log p(v) of each binary row of X (N, V) -> (N,) float64: ``-F(v) - log Z``.

        The hiddens are summed out exactly; only log Z differs between the methods (see
        :meth:`log_partition`, which takes the same ``method``, ``n_chains`` and ``n_betas``).
        """
        X, _ = self._input(X)
        _check_binary(X, "X")
        log_z, _ = self.log_partition(method, n_chains=n_chains, n_betas=n_betas)
        return -self._free_energy64(X.astype(np.float64)) - log_z

    # -- plumbing ---------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(super().__getstate__())
        optimizer = state.pop("_optimizer", None)
        if optimizer is not None:  # MomentumSGD caches parameter ids: rebuilt on load
            state["_optimizer_state"] = optimizer.state_dict()
        return state

    def __setstate__(self, state):
        state = dict(state)
        saved = state.pop("_optimizer_state", None)
        super().__setstate__(state)
        if "rbm_" in self.__dict__:
            self._optimizer = None
            if saved is not None:
                self._optimizer = rbm_optimizer(self.rbm_, lr=self.learning_rate)
                self._optimizer.load_state_dict(saved)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
