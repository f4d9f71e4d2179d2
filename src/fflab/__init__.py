"""fflab: layer-local contrastive learning (Forward-Forward, Boltzmann machines, RBMs)."""

__version__ = "0.1.0"
