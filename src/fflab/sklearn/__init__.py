"""scikit-learn estimators on fflab's models and trainers.

- :class:`FFClassifier`: supervised Forward-Forward classifier (``fit``, ``partial_fit``,
  ``predict``, ``predict_proba``, ``score``).
- :class:`FFFeatures`: unsupervised Forward-Forward features (a transformer).
- :class:`RBM`: Bernoulli RBM with the interface of ``sklearn.neural_network.BernoulliRBM``,
  plus CD-k / PCD-k, momentum, weight decay and exact or AIS log-likelihoods.

Arrays in, arrays out: float32 and float64 inputs are accepted (computation is float32,
fflab's model dtype; a float64 input is rounded to float32 first), transformers return the
input's float dtype, probabilities and log-likelihoods are float64. Sparse input is refused.
Needs scikit-learn 1.6 or later.
"""

try:
    import sklearn  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fflab.sklearn needs scikit-learn >= 1.6: pip install 'scikit-learn>=1.6'"
    ) from e

from .ff import FFClassifier, FFFeatures
from .rbm import RBM

__all__ = ["FFClassifier", "FFFeatures", "RBM"]
