"""fflab.sklearn: scikit-learn's estimator checks, pipelines, and oracles for each estimator."""

import itertools
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

pytest.importorskip("sklearn", minversion="1.6")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.neural_network import BernoulliRBM  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from fflab.boltzmann import RBM as TorchRBM  # noqa: E402
from fflab.boltzmann import rbm_optimizer, rbm_train_epoch  # noqa: E402
from fflab.ff.model import FFNet  # noqa: E402
from fflab.ff.train import FFTrainer  # noqa: E402
from fflab.negatives import hybrid_images  # noqa: E402
from fflab.sklearn import RBM, FFClassifier, FFFeatures  # noqa: E402
from fflab.sklearn._common import torch_generator  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models: one thread (see conftest)."""


def tiny_ff(**kw):
    return FFClassifier(**{"hidden_layer_sizes": (16, 16), "epochs": 5, "batch_size": 32,
                           "random_state": 0, **kw})  # fmt: skip


def tiny_features(**kw):
    settings = {"image_shape": (1, -1), "hidden_layer_sizes": (8, 8), "epochs": 2}
    return FFFeatures(**{**settings, "batch_size": 32, "random_state": 0, **kw})


def tiny_rbm(**kw):
    return RBM(**{"n_components": 4, "n_iter": 2, "random_state": 0, **kw})


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits scaled to [0, 1]: (X_train, X_test, y_train, y_test)."""
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.3, random_state=0)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- scikit-learn's estimator checks --------------------------------------------------------

# Checks that fit on data outside [0, 1] (standardized blobs, uniform draws on [0, 3], ...).
# A Bernoulli RBM's visible values are probabilities, so RBM refuses such data with a
# ValueError; every one of these checks passes on Pipeline(MinMaxScaler(clip=True), RBM),
# which is checked too.
RBM_RANGE_CHECKS = (
    "check_estimators_dtypes",
    "check_estimators_fit_returns_self",
    "check_readonly_memmap_input",
    "check_pipeline_consistency",
    "check_estimators_overwrite_params",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_fit2d_1sample",
    "check_fit2d_1feature",
    "check_dict_unchanged",
    "check_dont_overwrite_parameters",
    "check_fit_idempotent",
    "check_fit_check_is_fitted",
    "check_n_features_in",
    "check_fit2d_predict1d",
    "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit",
)
RANGE_REASON = "RBM refuses X outside [0, 1] (Bernoulli visible units), which this check feeds it"
# The pipeline in front of the RBM: what fails there is the Pipeline's own behaviour or the
# pseudo-likelihood's, and scikit-learn's test suite marks the same checks for Pipeline and
# BernoulliRBM.
STEPS_REASON = "Pipeline replaces the estimators in its `steps` parameter by fitted ones"
ORDER_REASON = (
    "score_samples is BernoulliRBM's pseudo-likelihood: the feature flipped in each row is drawn "
    "by the row's position, so it changes with the order and the subset of the rows"
)
PIPELINE_FAILURES = {
    "check_dont_overwrite_parameters": STEPS_REASON,
    "check_estimators_overwrite_params": STEPS_REASON,
    "check_methods_sample_order_invariance": ORDER_REASON,
    "check_methods_subset_invariance": ORDER_REASON,
}


def expected_failures(estimator) -> dict[str, str]:
    if isinstance(estimator, RBM):
        return dict.fromkeys(RBM_RANGE_CHECKS, RANGE_REASON)
    if isinstance(estimator, Pipeline):
        return PIPELINE_FAILURES
    return {}


@parametrize_with_checks(
    [
        tiny_ff(),
        tiny_features(),
        tiny_rbm(),
        make_pipeline(MinMaxScaler(clip=True), tiny_rbm()),
    ],
    expected_failed_checks=expected_failures,
    xfail_strict=True,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# -- pipelines, grid search, parameters ------------------------------------------------------


def test_ff_classifier_in_grid_search(digits):
    X_tr, X_te, y_tr, y_te = digits
    pipe = Pipeline([("scale", MinMaxScaler()), ("ff", tiny_ff(hidden_layer_sizes=(64, 64)))])
    grid = GridSearchCV(pipe, {"ff__epochs": [1, 15]}, cv=2).fit(X_tr[:600], y_tr[:600])
    assert grid.best_params_ == {"ff__epochs": 15}  # 1 epoch is far from trained
    assert grid.best_estimator_.named_steps["ff"].n_iter_ == 15
    assert grid.score(X_te, y_te) > 0.8


def test_rbm_in_grid_search(digits):
    X_tr, X_te, y_tr, y_te = digits
    pipe = Pipeline(
        [("rbm", RBM(n_iter=5, random_state=0)), ("lr", LogisticRegression(C=100, max_iter=3000))]
    )
    grid = GridSearchCV(pipe, {"rbm__n_components": [2, 64]}, cv=2)
    grid.fit(X_tr[:600], y_tr[:600])
    assert grid.best_params_ == {"rbm__n_components": 64}  # 2 hidden units cannot hold 10 digits
    assert grid.best_estimator_.named_steps["rbm"].components_.shape == (64, 64)
    assert grid.score(X_te, y_te) > 0.8


def test_ff_features_in_grid_search(digits):
    X_tr, X_te, y_tr, y_te = digits
    features = FFFeatures(image_shape=(8, 8), hidden_layer_sizes=(64, 64), epochs=5, random_state=0)
    pipe = Pipeline([("ff", features), ("lr", LogisticRegression(max_iter=2000))])
    grid = GridSearchCV(pipe, {"ff__layers": [(0,), (0, 1)]}, cv=2).fit(X_tr[:600], y_tr[:600])
    assert set(grid.best_params_) == {"ff__layers"}
    width = 64 * len(grid.best_params_["ff__layers"])
    assert grid.best_estimator_[:-1].transform(X_te).shape == (len(X_te), width)
    assert grid.score(X_te, y_te) > 0.8


@pytest.mark.parametrize("make", [tiny_ff, tiny_features, tiny_rbm])
def test_clone_and_params_round_trip(make, digits):
    est = make(batch_size=7)
    params = est.get_params()
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert type(est)(**params).get_params() == params
    assert twin.set_params(batch_size=9).get_params() == {**params, "batch_size": 9}
    X, _, y, _ = digits
    est.fit(X[:100], y[:100])
    fresh = clone(est)
    assert fresh.get_params() == params and not hasattr(fresh, "n_features_in_")


# -- FFClassifier ---------------------------------------------------------------------------


@pytest.mark.parametrize("inference", ["goodness", "softmax"])
def test_ff_classifier_learns_digits(digits, inference):
    X_tr, X_te, y_tr, y_te = digits
    clf = FFClassifier(hidden_layer_sizes=(200, 200), epochs=30, random_state=0)
    clf.fit(X_tr, y_tr).set_params(inference=inference)
    # 10 classes: chance is 90% error; this net gets about 4% (540 test images)
    assert 1 - clf.score(X_te, y_te) < 0.08
    assert clf.loss_curve_[-1] < 0.1 * clf.loss_curve_[0]


def test_ff_classifier_labels_of_any_type(digits):
    X, _, y, _ = digits
    X, y = X[:300], y[:300]
    names = np.array([f"digit {d}" for d in range(10)], dtype=object)
    by_int = tiny_ff().fit(X, y)
    by_name = tiny_ff().fit(X, names[y])
    assert list(by_name.classes_) == list(names)
    assert np.array_equal(by_name.predict(X), names[by_int.predict(X)])
    assert np.array_equal(by_name.predict_proba(X), by_int.predict_proba(X))


def test_ff_classifier_proba_matches_scores(digits):
    X, _, y, _ = digits
    clf = tiny_ff().fit(X[:300], y[:300])
    x = torch.from_numpy(X[:50].astype(np.float32))
    for mode, scores in (("goodness", clf.net_.label_scores), ("softmax", clf.net_.head_logits)):
        p = clf.set_params(inference=mode).predict_proba(X[:50].astype(np.float32))
        expected = torch.softmax(scores(x).double(), 1).numpy()
        np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-15)
        assert np.array_equal(clf.predict(X[:50]), clf.classes_[p.argmax(1)])


def test_ff_partial_fit_equals_fit(digits):
    X, _, y, _ = digits
    X, y = X[:300], y[:300]
    fitted = tiny_ff(epochs=4).fit(X, y)
    stepped = tiny_ff(epochs=4)
    for _ in range(4):
        stepped.partial_fit(X, y, classes=np.arange(10))
    assert states_equal(fitted.net_, stepped.net_)  # bit-exact
    assert fitted.loss_curve_ == stepped.loss_curve_
    assert np.array_equal(fitted.predict_proba(X), stepped.predict_proba(X))


def test_ff_classifier_is_fflab_trainer(digits):
    """fit is fflab's FFTrainer on the same generator, epoch by epoch (bit-exact)."""
    X, _, y, _ = digits
    X, y = X[:200].astype(np.float32), y[:200]
    clf = tiny_ff(epochs=3, negatives="random", lr_schedule="constant").fit(X, y)
    g = torch_generator(0)
    net = FFNet(clf.net_.config, generator=g)
    trainer = FFTrainer(net, clf._train_config_)
    for epoch in range(3):
        trainer.train_epoch(torch.from_numpy(X), torch.from_numpy(y), epoch, g)
    assert net.config.label_mode == "concat"
    assert states_equal(net, clf.net_)


def test_ff_partial_fit_checks_classes(digits):
    X, _, y, _ = digits
    clf = tiny_ff()
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X[:50], y[:50])
    clf.partial_fit(X[:50], y[:50] % 3, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="not in classes_"):
        clf.partial_fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="differs"):
        clf.partial_fit(X[:50], y[:50] % 3, classes=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        tiny_ff().fit(X[:10], np.zeros(10))


def test_ff_pickle_resumes_exactly(digits):
    X, _, y, _ = digits
    X, y = X[:200], y[:200]
    a = tiny_ff().partial_fit(X, y, classes=np.arange(10))
    b = pickle.loads(pickle.dumps(a))
    a.partial_fit(X, y)
    b.partial_fit(X, y)
    assert states_equal(a.net_, b.net_)


def test_ff_float32_and_float64_match(digits):
    X, _, y, _ = digits
    X, y = X[:300], y[:300]
    a = tiny_ff().fit(X, y)
    b = tiny_ff().fit(X.astype(np.float32), y)
    assert states_equal(a.net_, b.net_)  # float64 is rounded to float32 first
    p64, p32 = a.predict_proba(X), a.predict_proba(X.astype(np.float32))
    assert p64.dtype == p32.dtype == np.float64
    np.testing.assert_allclose(p64, p32, rtol=1e-4, atol=1e-6)
    f = tiny_features().fit(X)
    t64, t32 = f.transform(X), f.transform(X.astype(np.float32))
    assert (t64.dtype, t32.dtype) == (np.float64, np.float32)
    np.testing.assert_allclose(t64, t32, rtol=1e-4, atol=1e-5)


def test_sparse_input_is_refused(digits):
    X, _, y, _ = digits
    for est, args in ((tiny_ff(), (y[:20],)), (tiny_features(), ()), (tiny_rbm(), ())):
        with pytest.raises(TypeError, match="dense data is required"):
            est.fit(sp.csr_matrix(X[:20]), *args)


# -- FFFeatures -----------------------------------------------------------------------------


def test_ff_features_need_an_image_shape(digits):
    X = digits[0][:20]
    with pytest.raises(ValueError, match="needs image_shape"):
        FFFeatures(epochs=1).fit(X)
    with pytest.raises(ValueError, match="holds 63 values"):
        FFFeatures(image_shape=(7, 9), epochs=1).fit(X)
    with pytest.raises(ValueError, match="one channel"):
        FFFeatures(image_shape=(3, 4, 4), epochs=1).fit(np.zeros((20, 48)))
    f = FFFeatures(image_shape=(-1, 8), hidden_layer_sizes=(8,), epochs=1).fit(X)
    assert f.image_shape_ == (1, 8, 8) and f.net_.config.label_mode == "none"


def test_ff_features_are_rms_normalized_layers(digits):
    X = digits[0][:200].astype(np.float32)
    f = tiny_features(hidden_layer_sizes=(8, 6, 4), layers=(0, 2)).fit(X)
    z = f.transform(X)
    assert z.shape == (200, 12)
    acts = f.net_.activities(torch.from_numpy(X))
    expected = acts[2] * torch.rsqrt(acts[2].square().mean(1, keepdim=True) + 1e-8)
    np.testing.assert_array_equal(z[:, 8:], expected.detach().numpy())
    np.testing.assert_allclose(np.mean(z[:, :8] ** 2, 1), 1.0, rtol=1e-5)
    assert list(f.get_feature_names_out()) == [f"fffeatures{i}" for i in range(12)]
    assert f.set_params(layers=None).transform(X).shape == (200, 10)  # layers 1..


def test_ff_features_learn_to_tell_images_from_hybrids(digits):
    """The FF objective on held-out rows: real digits get more goodness than hybrids."""
    X_tr, X_te = digits[0], digits[1]
    f = FFFeatures(image_shape=(8, 8), hidden_layer_sizes=(100, 100), epochs=20, random_state=0)
    f.fit(X_tr)
    x = torch.from_numpy(X_te.astype(np.float32))
    hybrids = hybrid_images(x, (8, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        real, fake = f.net_.activities(x), f.net_.activities(hybrids)
    for a, b in zip(real, fake, strict=True):
        # about 0.5 untrained, 0.77-0.80 after 20 epochs (seeds 0-2)
        assert float((a.square().sum(1) > b.square().sum(1)).double().mean()) > 0.7
    assert f.loss_curve_[-1] < 0.5 * f.loss_curve_[0]


# -- RBM ------------------------------------------------------------------------------------


def small_binary(n=200, v=6, seed=0):
    return (np.random.default_rng(seed).random((n, v)) < 0.3).astype(np.float64)


def brute_force_log_prob(W, b_v, b_h, X):
    """log p(v) by summing exp(-E(v, h)) over every (v, h), in plain numpy."""

    def log_unnormalized(v):  # log sum_h exp(v'Wh + b_v.v + b_h.h)
        hs = np.array(list(itertools.product([0.0, 1.0], repeat=len(b_h))))  # (2^H, H)
        return np.logaddexp.reduce(v @ W @ hs.T + (v @ b_v)[:, None] + hs @ b_h, axis=1)

    vs = np.array(list(itertools.product([0.0, 1.0], repeat=len(b_v))))  # (2^V, V)
    log_z = np.logaddexp.reduce(log_unnormalized(vs))
    return log_unnormalized(X) - log_z


def test_rbm_exact_log_prob_equals_brute_force():
    X = small_binary(v=5)
    rbm = RBM(n_components=3, learning_rate=0.1, n_iter=20, random_state=0).fit(X)
    W = rbm.components_.T.astype(np.float64)
    b_v, b_h = rbm.intercept_visible_.astype(np.float64), rbm.intercept_hidden_.astype(np.float64)
    assert np.abs(W).max() > 0.1  # trained away from the N(0, 0.01) start
    expected = brute_force_log_prob(W, b_v, b_h, X[:40])
    np.testing.assert_allclose(rbm.log_prob(X[:40]), expected, rtol=1e-10)
    every = np.array(list(itertools.product([0.0, 1.0], repeat=5)))
    np.testing.assert_allclose(np.exp(rbm.log_prob(every)).sum(), 1.0, rtol=1e-10)


def test_rbm_ais_log_prob_close_to_exact():
    X = small_binary(v=12)
    rbm = RBM(n_components=8, n_iter=30, learning_rate=0.05, random_state=0).fit(X)
    log_z, se = rbm.log_partition("ais", n_chains=200, n_betas=2000)
    exact, zero = rbm.log_partition("exact")
    assert zero == 0.0 and se < 0.02
    assert abs(log_z - exact) < 0.05
    np.testing.assert_allclose(rbm.log_prob(X[:10], "ais", n_betas=2000, n_chains=200),
                               rbm.log_prob(X[:10]) + exact - log_z, rtol=1e-12)  # fmt: skip


def test_rbm_log_prob_refuses_bad_input():
    rbm = tiny_rbm().fit(small_binary())
    with pytest.raises(ValueError, match="binary"):
        rbm.log_prob(np.full((2, 6), 0.5))
    with pytest.raises(ValueError, match="method must be one of exact, ais"):
        rbm.log_prob(small_binary(2), method="mc")
    big = RBM(n_components=30, n_iter=1, random_state=0).fit(small_binary(v=30))
    with pytest.raises(ValueError, match="too large for exact enumeration"):
        big.log_prob(small_binary(2, v=30))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_rbm().fit(small_binary() * 2)


def test_rbm_matches_bernoulli_rbm_on_the_same_weights(digits):
    X = digits[0][:100]
    ours = RBM(n_components=16, n_iter=3, random_state=3).fit(X)
    theirs = BernoulliRBM(n_components=16, random_state=3).fit(X[:10])  # then overwritten
    theirs.components_ = ours.components_.astype(np.float64)
    theirs.intercept_hidden_ = ours.intercept_hidden_.astype(np.float64)
    theirs.intercept_visible_ = ours.intercept_visible_.astype(np.float64)
    np.testing.assert_allclose(ours.transform(X), theirs.transform(X), rtol=1e-12)
    # the same features flipped (same random_state), the same pseudo-likelihood
    np.testing.assert_allclose(ours.score_samples(X), theirs.score_samples(X), rtol=1e-9)
    assert ours.h_samples_.shape == theirs.h_samples_.shape == (10, 16)
    assert list(ours.get_feature_names_out()) == [f"rbm{i}" for i in range(16)]


def reference_fit(X, n_iter, **kw):
    """The estimator's fit written with fflab's rbm_train_epoch."""
    g = torch_generator(kw.pop("random_state"))
    rbm = TorchRBM(X.shape[1], kw.pop("n_components"), generator=g)
    bs = kw.pop("batch_size")
    rbm.persistent_h, rbm.persistent_v = torch.zeros(bs, rbm.n_hidden), torch.zeros(bs, X.shape[1])
    opt = rbm_optimizer(rbm, lr=kw.pop("learning_rate"), momentum=kw.pop("momentum"),
                        weight_decay=kw.pop("weight_decay"))  # fmt: skip
    x = torch.from_numpy(X.astype(np.float32))
    for _ in range(n_iter):
        rbm_train_epoch(rbm, x, batch_size=bs, optimizer=opt, generator=g, **kw)
    return rbm


@pytest.mark.parametrize("persistent", [True, False])
def test_rbm_is_fflab_trainer(digits, persistent):
    """With momentum (fflab's optimizer) fit equals rbm_train_epoch bit for bit; plain SGD
    (its in-place step) to float32 rounding."""
    X = digits[0][:300]
    settings = {"n_components": 16, "learning_rate": 0.05, "batch_size": 20, "random_state": 5}
    settings.update(k=2, persistent=persistent)
    for momentum, weight_decay in ((0.5, 1e-3), (0.0, 0.0)):
        est = RBM(n_iter=3, momentum=momentum, weight_decay=weight_decay, **settings).fit(X)
        ref = reference_fit(X, 3, momentum=momentum, weight_decay=weight_decay, **settings)
        if momentum:
            assert states_equal(est.rbm_, ref)  # weights, biases and persistent chains
        else:
            np.testing.assert_allclose(est.components_, ref.W.detach().T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_rbm_partial_fit_equals_fit(digits, momentum):
    X = digits[0][:200]
    fitted = RBM(n_components=16, n_iter=3, momentum=momentum, random_state=1).fit(X)
    stepped = RBM(n_components=16, n_iter=3, momentum=momentum, random_state=1)
    for _ in range(3):
        stepped.partial_fit(X)
    assert states_equal(fitted.rbm_, stepped.rbm_)


def test_rbm_pickle_resumes_exactly(digits):
    X = digits[0][:200]
    a = RBM(n_components=16, momentum=0.5, weight_decay=1e-3, random_state=1).partial_fit(X)
    b = pickle.loads(pickle.dumps(a))
    a.partial_fit(X)
    b.partial_fit(X)
    assert states_equal(a.rbm_, b.rbm_)


def test_rbm_float32_and_float64_match(digits):
    X = digits[0][:200]
    a = RBM(n_components=16, n_iter=2, random_state=0).fit(X)
    b = RBM(n_components=16, n_iter=2, random_state=0).fit(X.astype(np.float32))
    assert states_equal(a.rbm_, b.rbm_)
    t64, t32 = a.transform(X), a.transform(X.astype(np.float32))
    assert (t64.dtype, t32.dtype) == (np.float64, np.float32)
    np.testing.assert_allclose(t64, t32, rtol=1e-5, atol=1e-6)


def test_rbm_attributes_are_the_model(digits):
    X = digits[0][:50]
    rbm = tiny_rbm().fit(X)
    assert rbm.components_.shape == (4, 64) and rbm.intercept_visible_.shape == (64,)
    rbm.components_ = np.zeros((4, 64))
    rbm.intercept_hidden_ = np.full(4, 2.0)
    np.testing.assert_allclose(rbm.transform(X), 1 / (1 + np.exp(-2.0)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"components_ must have shape \(4, 64\)"):
        rbm.components_ = np.zeros((64, 4))
    with pytest.raises(AttributeError):
        tiny_rbm().components_  # noqa: B018
    v = rbm.gibbs(X)
    assert v.shape == X.shape and set(np.unique(v)) <= {0.0, 1.0}


def test_verbose_reports_every_epoch(digits, capsys):
    X, _, y, _ = digits
    tiny_ff(epochs=2, verbose=1).fit(X[:100], y[:100])
    tiny_rbm(n_iter=3, verbose=1).fit(X[:100])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [
        "FFClassifier epoch 1",
        "FFClassifier epoch 2",
        "RBM epoch 1",
        "RBM epoch 2",
        "RBM epoch 3",
    ]
