"""Helpers shared by the run-directory tests: interrupt a run, compare checkpoints."""

import contextlib
from pathlib import Path

import pytest
import torch

from fflab import checkpoint, runs

CPU = torch.device("cpu")


class Stop(Exception):
    """Raised in place of an epoch to interrupt a run."""


def train_interrupted(config, run_dir: Path, data_dir: Path, stop_at_epoch: int = 1) -> None:
    """Run ``config`` into ``run_dir`` and interrupt it when 0-based ``stop_at_epoch`` starts.

    The epochs before it finish and are checkpointed, as after a real interruption.
    """
    exp = runs.build_experiment(config, str(data_dir), CPU)
    train_epoch = exp.train_epoch

    def stopping(epoch, generator, on_batch):
        if epoch == stop_at_epoch:
            raise Stop
        return train_epoch(epoch, generator, on_batch)

    exp.train_epoch = stopping
    build = runs.build_experiment
    runs.build_experiment = lambda *args: exp
    try:
        with pytest.raises(Stop):
            runs.train(config, run_dir, device=CPU, data_dir=data_dir, progress=False)
    finally:
        runs.build_experiment = build


def assert_same_checkpoints(a_dir: Path, b_dir: Path) -> None:
    """The two run directories' checkpoints hold the same tensors, bit for bit."""
    a = checkpoint.load(a_dir / runs.CHECKPOINT)[0]
    b = checkpoint.load(b_dir / runs.CHECKPOINT)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@contextlib.contextmanager
def stop_at_second_checkpoint():
    """Inside, a run stops with :class:`Stop` where it would write its second checkpoint, so
    its first epoch is saved and the second is lost, as after a real interruption."""
    calls = {"n": 0}
    save = checkpoint.save

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop
        return save(*a, **k)

    checkpoint.save = interrupt
    try:
        with pytest.raises(Stop):
            yield
    finally:
        checkpoint.save = save
