"""Optimizers and learning-rate schedules shared by the training loops.

:class:`MomentumSGD` is the one momentum SGD of the project (FF, backprop, RBM and BM); its
options select the convention of each; :class:`SmoothedSGD` is FF's preset of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _functional_sgd

FUSED_SGD = torch.__version__ >= "2.4"  # torch's fused SGD kernel runs on CPU from 2.4 on

# the options that choose the update rule; settable per parameter group like lr
CONVENTIONS = ("lr_in_velocity", "smoothing", "decay_in_velocity", "maximize")
VELOCITY = "velocity"  # the state key of the velocity buffer
_LEGACY_KEYS = ("inc", "momentum_buffer")  # SmoothedSGD's and torch.optim.SGD's names for it


def reference_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    velocities: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    lr_in_velocity: bool = False,
    smoothing: bool = False,
    decay_in_velocity: bool = True,
    maximize: bool = False,
) -> None:
    """The update of :class:`MomentumSGD`, written plainly (for tests; no fusion, no state).

    With ``s = +1`` for ascent (``maximize``) and ``-1`` for descent, ``c = (1 - momentum if
    smoothing else 1) * (lr if lr_in_velocity else 1)`` and ``eta = 1 if lr_in_velocity else
    lr``, for each parameter ``p`` with gradient ``g`` and velocity ``v`` (same shapes):

    - decay in the velocity: ``v = momentum * v + c * (g - s * weight_decay * p)``, then
      ``p += s * eta * v``;
    - decay outside it: ``v = momentum * v + c * g``, then
      ``p += s * eta * v - lr * weight_decay * p`` (``p`` before the step).

    ``params`` and ``velocities`` are updated in place.
    """
    sign = 1.0 if maximize else -1.0
    gain = (1.0 - momentum if smoothing else 1.0) * (lr if lr_in_velocity else 1.0)
    eta = 1.0 if lr_in_velocity else lr
    for p, g, v in zip(params, grads, velocities, strict=True):
        decay = weight_decay * p
        if decay_in_velocity:
            g = g - sign * decay
        v.copy_(momentum * v + gain * g)
        step = sign * eta * v
        if not decay_in_velocity:
            step = step - lr * decay
        p.add_(step)


class MomentumSGD(torch.optim.Optimizer):
    """Momentum SGD in every convention the project uses, with fused gradient folds.

    The update is that of :func:`reference_step_`; the options choose its convention:

    - ``lr_in_velocity``: False: ``p -= lr * v`` (torch, FF); True: ``v = m v + lr g`` and
      ``p -= v`` (Hinton's RBM guide, BM).
    - ``smoothing``: True: the gradient is averaged into the velocity, ``v = m v + (1 - m) g``
      (Hinton's FF code: the step does not grow by ``1 / (1 - m)``); False: added, ``v = m v +
      g`` (torch's classic momentum, no dampening).
    - ``decay_in_velocity``: True: the weight decay is part of the gradient that goes into the
      velocity (torch, RBM, BM); False: it shrinks the parameter outside it, ``p -= lr *
      weight_decay * p`` (FF).
    - ``maximize``: ascent on the given gradient instead of descent. The velocity keeps the
      gradient's sign, so an ascent's velocity is the step itself.

    The defaults are ``torch.optim.SGD``'s classic momentum. lr, momentum, weight_decay and
    the four options can be set per parameter group. The velocity starts at zero (torch's SGD
    starts it at the first gradient, which is the same without smoothing); it is
    ``state[p]["velocity"]``.

    A gradient can reach the velocity three ways. Written to ``p.grad`` (after
    ``loss.backward()``), then :meth:`step`. Or folded in before :meth:`step`, which then
    leaves the velocity as it is: :meth:`fold_product_` takes a gradient given as a matrix
    product ``a @ b`` in one GEMM with ``beta = momentum`` (no gradient written, no passes over
    it), :meth:`fold_` a gradient tensor; both can fold column blocks of a parameter separately.
    Each column of a folded parameter must be folded exactly once per step, and a fold uses
    its group's lr and momentum at the time of the fold. :meth:`step` then applies the decay
    and the step in one pass over each parameter where it can (see :func:`_decay_and_step_`).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        lr_in_velocity: bool = False,
        smoothing: bool = False,
        decay_in_velocity: bool = True,
        maximize: bool = False,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        defaults.update(
            lr_in_velocity=lr_in_velocity,
            smoothing=smoothing,
            decay_in_velocity=decay_in_velocity,
            maximize=maximize,
        )
        _check_settings(defaults)
        self._folded: set[int] = set()  # ids of parameters whose gradient is in the velocity
        self._group_index: tuple[list, int, dict[int, dict]] | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:  # noqa: D102
        super().add_param_group(param_group)
        _check_settings(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, also reading velocities saved as ``inc`` (SmoothedSGD) or
        ``momentum_buffer`` (``torch.optim.SGD``)."""
        state = {}
        for idx, s in state_dict["state"].items():
            s = dict(s)
            for key in _LEGACY_KEYS:
                if key in s and VELOCITY not in s:
                    s[VELOCITY] = s.pop(key)
            state[idx] = s
        super().load_state_dict({**state_dict, "state": state})

    def _group(self, p: Tensor) -> dict:
        # looked up by identity; rebuilt when the groups change (load_state_dict replaces them)
        groups = self.param_groups
        index = self._group_index
        if index is None or index[0] is not groups or index[1] != len(groups):
            table = {id(q): g for g in groups for q in g["params"]}
            index = self._group_index = (groups, len(groups), table)
        group = index[2].get(id(p))
        if group is None:
            raise ValueError("the tensor is not a parameter of this optimizer")
        return group

    def _velocity(self, p: Tensor) -> Tensor:
        state = self.state[p]
        v = state.get(VELOCITY)
        if v is None:
            v = state[VELOCITY] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return v

    @torch.no_grad()
    def fold_product_(self, p: Tensor, a: Tensor, b: Tensor, columns: slice = slice(None)) -> None:
        """Fold the gradient ``a @ b`` of ``p[:, columns]`` into the velocity in one GEMM.

        ``v[:, columns] = momentum * v[:, columns] + c * (a @ b)`` (``c`` as in
        :func:`reference_step_`). p: (R, C); a: (R, n); b: (n, len(columns)).
        """
        group = self._group(p)
        m = group["momentum"]
        self._velocity(p)[:, columns].addmm_(a, b, beta=m, alpha=_gain(group))
        self._folded.add(id(p))

    @torch.no_grad()
    def fold_(self, p: Tensor, grad: Tensor, columns: slice = slice(None)) -> None:
        """Fold a gradient ``grad`` of ``p[..., columns]`` into the velocity.

        ``v[..., columns] = momentum * v[..., columns] + c * grad`` (``c`` as in
        :func:`reference_step_`); ``grad`` has the shape of ``p[..., columns]``.
        """
        group = self._group(p)
        m, gain = group["momentum"], _gain(group)
        v = self._velocity(p)[..., columns]
        if group["smoothing"] and not group["lr_in_velocity"]:  # gain = 1 - m: one pass
            v.lerp_(grad, gain)
        else:
            v.mul_(m).add_(grad, alpha=gain)
        self._folded.add(id(p))

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a folded gradient or a ``.grad`` (folds first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        self._folded.clear()
        return loss

    def _step_group(self, group: dict) -> None:
        folded = self._folded
        params = [p for p in group["params"] if id(p) in folded]
        vels = [self._velocity(p) for p in params]
        fresh = [p for p in group["params"] if p.grad is not None and id(p) not in folded]
        if fresh:
            fresh_vels = [self._velocity(p) for p in fresh]
            torch._foreach_mul_(fresh_vels, group["momentum"])
            torch._foreach_add_(fresh_vels, [p.grad for p in fresh], alpha=_gain(group))
            params += fresh
            vels += fresh_vels
        if not params:
            return
        lr, wd, ascent = group["lr"], group["weight_decay"], group["maximize"]
        sign = 1.0 if ascent else -1.0
        eta = 1.0 if group["lr_in_velocity"] else lr
        if group["decay_in_velocity"]:
            if wd:
                torch._foreach_add_(vels, params, alpha=-sign * _gain(group) * wd)
            torch._foreach_add_(params, vels, alpha=sign * eta)
        elif wd and eta:
            _decay_and_step_(params, vels, eta, lr * wd / eta, maximize=ascent)
        else:  # no decay, or lr = 0 outside the velocity (then nothing moves)
            torch._foreach_add_(params, vels, alpha=sign * eta)


class SmoothedSGD(MomentumSGD):
    """Hinton's FF convention of :class:`MomentumSGD`: an exponentially smoothed gradient.

    ``inc = momentum * inc + (1 - momentum) * grad`` then ``p -= lr * (inc + weight_decay * p)``
    (``smoothing=True, decay_in_velocity=False``): unlike ``torch.optim.SGD`` the step does not
    grow by ``1 / (1 - momentum)`` and the weight cost is applied outside the smoothing.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(
            params, lr, momentum, weight_decay, smoothing=True, decay_in_velocity=False
        )


def _gain(group: dict) -> float:
    """The factor ``c`` of the gradient in the velocity (see :func:`reference_step_`)."""
    gain = 1.0 - group["momentum"] if group["smoothing"] else 1.0
    return gain * group["lr"] if group["lr_in_velocity"] else gain


def _check_settings(group: dict) -> None:
    for name, ok, need in (
        ("lr", lambda x: x >= 0, ">= 0"),
        ("momentum", lambda x: 0 <= x < 1, "in [0, 1)"),
        ("weight_decay", lambda x: x >= 0, ">= 0"),
    ):
        x = group[name]
        if isinstance(x, bool) or not isinstance(x, int | float) or not ok(x):
            raise ValueError(f"{name} must be a number {need}, got {x!r}")
    for name in CONVENTIONS:
        if not isinstance(group[name], bool):
            raise ValueError(f"{name} must be True or False, got {group[name]!r}")


def _decay_and_step_(
    params: list, vels: list, lr: float, wd: float, *, maximize: bool = False
) -> None:
    """``p -= lr * (v + wd * p)`` (``maximize``: ``p -= lr * (-v + wd * p)``) for every
    parameter, in one pass over memory.

    That is plain SGD without momentum on the "gradient" ``v``, which torch's fused SGD
    kernel does in one read of ``p`` and ``v`` (two foreach passes otherwise).
    """
    fused = FUSED_SGD and all(p.device.type in ("cpu", "cuda") for p in params)
    hyper = {"weight_decay": wd, "momentum": 0.0, "lr": lr, "dampening": 0.0}
    hyper.update(nesterov=False, maximize=maximize)
    if fused and len({(p.device, p.dtype) for p in params}) == 1:
        # the kernel itself: torch.optim's wrapper regroups by device and dtype on every call
        torch._fused_sgd_(params, vels, [], is_first_step=False, **hyper)
        return
    foreach = None if fused else True
    _functional_sgd(params, vels, [None] * len(params), fused=fused, foreach=foreach, **hyper)


def hinton_lr_factor(epoch: int, epochs: int) -> float:
    """Learning-rate multiplier of Hinton's FF code for 0-based ``epoch`` of ``epochs``.

    1 for the first half of training, then ``(1 + 2 * (epochs - epoch - 1)) / epochs``, falling
    linearly to ``1 / epochs`` in the last epoch.
    """
    if epoch + 1 <= epochs / 2:
        return 1.0
    return (1 + 2 * (epochs - epoch - 1)) / epochs


def lr_factor(epoch: int, epochs: int, schedule: str) -> float:
    """Learning-rate multiplier for 0-based ``epoch``: ``hinton`` or ``constant``."""
    if schedule == "constant":
        return 1.0
    if schedule == "hinton":
        return hinton_lr_factor(epoch, epochs)
    raise ValueError(f"unknown lr schedule {schedule!r}; choose hinton or constant")
