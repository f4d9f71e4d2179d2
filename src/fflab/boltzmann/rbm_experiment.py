"""RBM runs (``rbm``): the glue between :mod:`fflab.boltzmann` and the run loop.

:class:`RBMExperiment` trains a Bernoulli RBM on binarized images with CD-k or PCD-k and
momentum SGD (Hinton's practical guide). Per epoch it logs the reconstruction error
(``loss``) and the mean free energy of the training data; the final evaluation estimates
log Z by annealed importance sampling (Salakhutdinov & Murray 2008) and reports the average
test log-probability in nats, the hidden units summed out analytically. When the smaller
layer has at most ``exact_max_units`` units (the 25-hidden-unit RBM), log Z is also computed
exactly by enumeration, and the exact numbers sit beside the AIS ones.

Everything a resumed run needs is checkpointed: parameters, momentum velocities and the
persistent chains (buffers of the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fflab.config import RunConfig
from fflab.data import Datasets

from ._checks import bernoulli
from .ais import ais_log_z, make_base_rate_visible_bias
from .exact import binary_states
from .experiment import MomentumState, check_optimizer_settings, is_binary
from .rbm import RBM, free_energy, visible_probs
from .train import rbm_optimizer, rbm_train_epoch


@dataclass(frozen=True)
class RBMConfig:
    n_visible: int = 784
    n_hidden: int = 500

    def __post_init__(self) -> None:
        if self.n_visible < 1 or self.n_hidden < 1:
            raise ValueError("n_visible and n_hidden must be >= 1")


@dataclass(frozen=True)
class RBMTrainConfig:
    """How an RBM learns and how it is evaluated.

    The update is the practical guide's: velocity = momentum * velocity + lr * (grad -
    weight_decay * W), momentum ``momentum_initial`` for the first ``momentum_switch_epoch``
    epochs, then ``momentum_final``. ``lr_schedule`` hinton keeps lr for the first half of
    training and decays it linearly to 0 over the second half.

    k schedule: CD-k (or PCD-k) with ``k`` Gibbs steps. With ``k_final`` > 0 the number of
    steps instead grows linearly from ``k`` in the first epoch to ``k_final`` at epoch
    ``k_ramp_epochs`` (0-based) and stays there: ``k_e = round(k + (k_final - k) *
    min(1, e / k_ramp_epochs))``. Salakhutdinov & Murray (2008) trained their CD-25 RBM
    with the number of steps increased gradually during learning; this is a linear
    version of that idea, not their exact schedule (which the paper does not spell out).

    Evaluation: AIS with ``ais_chains`` chains and ``ais_betas`` intermediate
    distributions (14500: S&M's schedule), from the base-rate model of the training data,
    seeded with ``ais_seed``. When the smaller layer has at most ``exact_max_units`` units
    (0: never) log Z is also enumerated exactly (2**25 hidden states take about 4 minutes
    on one CPU core, a few seconds on a GPU).
    """

    epochs: int = 50
    batch_size: int = 100
    lr: float = 0.05
    lr_schedule: str = "constant"  # constant | hinton (constant, then linear decay to 0)
    momentum_initial: float = 0.5
    momentum_final: float = 0.9
    momentum_switch_epoch: int = 5
    weight_decay: float = 2e-4
    k: int = 1
    k_final: int = 0  # 0: k fixed; else ramp k -> k_final over k_ramp_epochs epochs
    k_ramp_epochs: int = 0
    persistent: bool = False  # PCD: batch_size persistent chains, checkpointed
    init_visible_bias: bool = True  # b_v = logit of the training pixel means
    ais_chains: int = 100
    ais_betas: int = 14500
    ais_seed: int = 0
    exact_max_units: int = 25

    def __post_init__(self) -> None:
        check_optimizer_settings(self)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.k_final < 0 or self.k_ramp_epochs < 0:
            raise ValueError("k_final and k_ramp_epochs must be >= 0")
        if self.ais_chains < 2 or self.ais_betas < 3:
            raise ValueError("ais_chains must be >= 2 and ais_betas >= 3")
        if not 0 <= self.exact_max_units <= 30:
            raise ValueError(f"exact_max_units must be in [0, 30], got {self.exact_max_units}")

    def k_at(self, epoch: int) -> int:
        """Gibbs steps per update in 0-based ``epoch``."""
        if self.k_final == 0:
            return self.k
        frac = 1.0 if self.k_ramp_epochs == 0 else min(1.0, epoch / self.k_ramp_epochs)
        return max(1, round(self.k + (self.k_final - self.k) * frac))


@torch.no_grad()
def mean_neg_free_energy(rbm: RBM, x: Tensor, batch_size: int = 1000) -> float:
    """Mean of -F(v) over the rows of x (N, V), in float64 and in chunks."""
    W, b_v, b_h = rbm.W.double(), rbm.b_v.double(), rbm.b_h.double()
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for i in range(0, x.shape[0], batch_size):
        v = x[i : i + batch_size].to(W)
        total -= free_energy(v, W, b_v, b_h).sum()
    return float(total) / x.shape[0]


@torch.no_grad()
def enumerate_rbm_log_z(
    W: Tensor, b_v: Tensor, b_h: Tensor, *, max_units: int = 30, dtype: torch.dtype | None = None
) -> float:
    """Exact log Z of an RBM by enumerating its smaller layer (up to ``max_units`` units).

    With s the enumerated layer (n units), o the other, M (n, n_o) the weights between
    them: log Z = logsumexp_s [b_s.s + sum_o softplus(b_o + (sM)_o)]. The states are
    split into two halves s = [a; c], so (sM) = aM_a + cM_c is one addition of two
    precomputed tables instead of a matmul per state. The softplus terms are computed and
    summed over the other layer in ``dtype`` (default: float64 up to 2**28 state-unit
    pairs, else float32, whose error in the final number is about 1e-4 nats for MNIST
    RBMs); the logsumexp over states is float64. Cost: 2**n * n_o softplus evaluations;
    for 25 hidden units and 784 pixels about 4 minutes on one CPU core (measured: 7.4 s
    for 2**20 states), a few seconds on a GPU.
    """
    if W.shape[1] <= W.shape[0]:
        M, b_s, b_o = W.T, b_h, b_v  # enumerate the hiddens
    else:
        M, b_s, b_o = W, b_v, b_h
    n, n_o = M.shape
    if n > max_units:
        raise ValueError(f"cannot enumerate {n} units (limit {max_units})")
    if dtype is None:
        dtype = torch.float64 if (1 << n) * n_o <= (1 << 28) else torch.float32
    M, b_s, b_o = M.detach().to(dtype), b_s.detach().double(), b_o.detach().to(dtype)
    n_a = (n + 1) // 2
    n_c = n - n_a
    dev = M.device
    s_a = binary_states(n_a, dtype=dtype, device=dev)  # (2^a, a)
    s_c = binary_states(n_c, dtype=dtype, device=dev)  # (2^c, c)
    table_a = torch.addmm(b_o, s_a, M[:n_a])  # (2^a, n_o)
    table_c = s_c @ M[n_a:]  # (2^c, n_o)
    lin_a = s_a.double() @ b_s[:n_a]  # (2^a,)
    lin_c = s_c.double() @ b_s[n_a:]  # (2^c,)
    if dev.type == "cpu":  # blocks of about 1 MiB stay in cache: 1.4x faster than big ones
        block_a, block_c = max(1, (1 << 18) // n_o), 1
    else:  # few, large kernels
        block_a, block_c = table_a.shape[0], max(1, (1 << 23) // table_a.numel())
    parts = []
    for j in range(0, table_c.shape[0], block_c):
        c = table_c[j : j + block_c, None]  # (r, 1, n_o)
        for i in range(0, table_a.shape[0], block_a):
            x = table_a[None, i : i + block_a] + c  # (r, m, n_o)
            log_w = F.softplus(x).sum(-1).double()  # (r, m); summed in dtype (fast)
            log_w += lin_a[None, i : i + block_a] + lin_c[j : j + block_c, None]
            parts.append(torch.logsumexp(log_w.flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0))


class RBMExperiment(MomentumState):
    @property
    def model(self) -> RBM:
        return self.rbm

    def __init__(self, config: RunConfig, data: Datasets, device: torch.device, generator):
        m: RBMConfig = config.model
        t: RBMTrainConfig = config.train
        if data.train.x.shape[1] != m.n_visible:
            raise ValueError(
                f"model.n_visible is {m.n_visible} but the images have {data.train.x.shape[1]} "
                "pixels"
            )
        if not is_binary(data.train.x) or not is_binary(data.test.x):
            raise ValueError(
                "an RBM run needs binary images: set data.binarize=sample or threshold"
            )
        self.config, self.data, self.device = config, data, device
        self.rbm = RBM(m.n_visible, m.n_hidden, generator=generator).to(device)
        if t.init_visible_bias:
            self.rbm.init_visible_bias_from(data.train.x)
        self.optimizer = rbm_optimizer(
            self.rbm, lr=t.lr, momentum=t.momentum_initial, weight_decay=t.weight_decay
        )
        self.epochs = t.epochs
        self.samples_per_epoch = len(data.train)
        # a fflab.distributed.Comm: train on this rank's rows and chains (see rbm_train_epoch)
        self.comm = None

    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The checkpoint; data-parallel, every rank's persistent chains gathered in the order
        of one process's chains (so any number of processes can resume it)."""
        tensors, meta = super().state_tensors()
        if self.comm is not None and self.rbm.persistent_h.shape[0] > 0:
            n = self.config.train.batch_size
            for name in ("persistent_v", "persistent_h"):
                tensors[f"model.{name}"] = self.comm.gather_rows(getattr(self.rbm, name), n)
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state_tensors(tensors, meta)
        if self.comm is not None and self.rbm.persistent_h.shape[0] > 0:
            rows = self.comm.rows(self.rbm.persistent_h.shape[0])
            self.rbm.persistent_v = self.rbm.persistent_v[rows].clone()
            self.rbm.persistent_h = self.rbm.persistent_h[rows].clone()

    def train_epoch(self, epoch: int, generator: torch.Generator, on_batch) -> dict[str, float]:
        t = self.config.train
        lr, momentum = self.set_epoch(t, epoch)
        k = t.k_at(epoch)
        stats = rbm_train_epoch(
            self.rbm,
            self.data.train.x,
            batch_size=t.batch_size,
            optimizer=self.optimizer,
            k=k,
            persistent=t.persistent,
            generator=generator,
            on_batch=on_batch,
            comm=self.comm,
        )
        return {
            "loss": stats["reconstruction_error"],
            "free_energy": stats["free_energy"],
            "k": k,
            "lr": lr,
            "momentum": momentum,
        }

    def epoch_evaluation(self) -> dict[str, float]:
        if self.data.validation is None:
            return {}
        bs = self.config.data.eval_batch_size
        return {"val_free_energy": -mean_neg_free_energy(self.rbm, self.data.validation.x, bs)}

    def exact_feasible(self) -> bool:
        n = min(self.rbm.n_visible, self.rbm.n_hidden)
        return n <= self.config.train.exact_max_units

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        t, bs = self.config.train, self.config.data.eval_batch_size
        g = torch.Generator(device=self.device).manual_seed(t.ais_seed)
        base = make_base_rate_visible_bias(self.data.train.x)
        ais = ais_log_z(self.rbm, t.ais_chains, t.ais_betas, generator=g, base_visible_bias=base)
        splits = {"test": self.data.test, "train": self.data.train}
        if self.data.validation is not None:
            splits["val"] = self.data.validation
        neg_f = {name: mean_neg_free_energy(self.rbm, s.x, bs) for name, s in splits.items()}
        out: dict[str, Any] = {f"{name}_logprob": v - ais.log_z for name, v in neg_f.items()}
        out.update(
            log_z=ais.log_z,
            log_z_std=ais.std_error,
            ais_chains=t.ais_chains,
            ais_betas=t.ais_betas,
            n_hidden=self.rbm.n_hidden,
            binarize=self.config.data.binarize,
        )
        if self.exact_feasible():
            log_z = enumerate_rbm_log_z(self.rbm.W, self.rbm.b_v, self.rbm.b_h)
            out["log_z_exact"] = log_z
            for name, v in neg_f.items():
                out[f"{name}_logprob_exact"] = v - log_z
        return out


def build_rbm(config: RunConfig, data: Datasets, device: torch.device, generator) -> RBMExperiment:
    return RBMExperiment(config, data, device, generator)


def rbm_model(model: RBMConfig) -> RBM:
    """An RBM of the configured size (weights as initialized, to be loaded)."""
    return RBM(model.n_visible, model.n_hidden)


def load_rbm(run_dir: Path, device: torch.device | str = "cpu") -> RBM:
    """The RBM of an ``rbm`` run directory's checkpoint (no data needed)."""
    from fflab.api import load_run

    model = load_run(run_dir, device)
    if not isinstance(model, RBM):
        raise ValueError(f"{run_dir} is not an rbm run")
    return model


@torch.no_grad()
def rbm_gibbs_samples(
    rbm: RBM, n_chains: int = 100, n_steps: int = 1000, *, generator: torch.Generator
) -> Tensor:
    """p(v | h) at the end of ``n_chains`` block Gibbs chains of ``n_steps`` steps each.

    The chains start from v drawn from sigmoid(b_v) (the visible biases alone) and leave
    the model's persistent chains untouched. -> (n_chains, V).
    """
    p0 = torch.sigmoid(rbm.b_v).expand(n_chains, rbm.n_visible)
    v = bernoulli(p0.contiguous(), generator)
    v = rbm.gibbs(v, max(n_steps - 1, 0), generator=generator)
    h, _ = rbm.sample_hidden(v, generator=generator)
    return visible_probs(h, rbm.W, rbm.b_v)
