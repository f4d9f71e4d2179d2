"""The run loop: run directories, checkpoints, resume, progress bars, divergence, summaries.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one line per
epoch), ``checkpoint.safetensors`` (written atomically after every epoch) and, when training
ends, ``summary.json``. Randomness is explicit: weights are drawn from a generator seeded with
the run's seed, and every epoch draws from its own generator seeded with (seed, epoch), so a
resumed run makes exactly the draws an uninterrupted one makes.

Launched by ``torchrun``, every process runs :func:`train` data-parallel (see
:mod:`fflab.distributed`): rank 0 alone reads and writes the run directory and sends the
config and checkpoint to the others; every rank checks for divergence at the same batches and
they agree by an all-reduce; a collective that fails stops the run with a :class:`RunError`.
A checkpoint holds no trace of the number of processes that wrote it (the replicas are equal
and persistent chains are saved in one process's order), so a run can be resumed with any
number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import fflab
from fflab import checkpoint, data, distributed
from fflab.checkpoint import CheckpointError
from fflab.config import ConfigError, RunConfig
from fflab.experiment import ALGORITHMS, BatchValues, Experiment
from fflab.presets import from_dict

CHECKPOINT = "checkpoint.safetensors"


class RunError(RuntimeError):
    """A run cannot go on (bad run directory, divergence); the message says why."""


class Diverged(RunError):
    pass


class BatchReporter:
    """The ``on_batch`` callback of one epoch: progress bar and divergence check.

    A batch's values are read (and, when a function, called) at most every ``every`` seconds
    and always on the epoch's last batch; on a GPU each read waits for the device, so reading
    every batch would stop the host from queueing the next step while the device works. A
    non-finite ``loss`` among the values read raises :class:`Diverged` with the message
    ``diverged(loss)``; one in between is caught by the end-of-epoch check. Without
    ``check`` it only shows progress (a pipeline stage, whose neighbours must stop with it).
    """

    def __init__(
        self,
        bar,
        total: int,
        diverged: Callable[[float], str],
        every: float = 0.5,
        clock: Callable[[], float] = time.perf_counter,
        check: bool = True,
    ) -> None:
        self.bar, self.total, self.diverged, self.every = bar, total, diverged, every
        self.clock, self.done, self.shown_at, self.check = clock, 0, -math.inf, check

    def __call__(self, n: int, values: BatchValues) -> None:
        self.bar.update(n - self.done)
        self.done = n
        now = self.clock()
        if now - self.shown_at < self.every and n < self.total:
            return
        self.shown_at = now
        values = values() if callable(values) else values
        if self.check and not math.isfinite(values.get("loss", 0.0)):
            raise Diverged(self.diverged(values["loss"]))
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)


class CollectiveReporter(BatchReporter):
    """The ``on_batch`` callback of a data-parallel epoch: progress bar and divergence check.

    Every rank checks its ``loss`` at the same batches (every ``check_every`` batches and the
    epoch's last) and the ranks all-reduce the flag, so a divergence seen by one stops every
    rank at the same point. The bar (rank 0's) is refreshed about every ``every`` seconds and
    never raises.
    """

    def __init__(self, bar, total, diverged, comm, check_every: int = 20, **kwargs) -> None:
        super().__init__(bar, total, diverged, **kwargs)
        self.comm, self.check_every, self.batches = comm, check_every, 0

    def __call__(self, n: int, values: BatchValues) -> None:
        self.bar.update(n - self.done)
        self.done, self.batches = n, self.batches + 1
        read = None
        if self.batches % self.check_every == 0 or n >= self.total:
            read = values() if callable(values) else values
            loss = read.get("loss", 0.0)
            if self.comm.any(not math.isfinite(loss)):
                raise Diverged(self.diverged(loss))
        if self.bar.disable:
            return
        now = self.clock()
        if now - self.shown_at < self.every and n < self.total:
            return
        self.shown_at = now
        read = read or (values() if callable(values) else values)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in read.items()}, refresh=False)


def diverged_message(epoch: int, out_dir: Path, loss: float) -> str:
    """The message of a run that diverged in 0-based ``epoch``."""
    return (
        f"training diverged in epoch {epoch + 1} (loss {loss}); "
        f"kept the checkpoint of epoch {epoch} in {out_dir}"
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available; use --device cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device {name!r}: choose auto, cpu or cuda")


def prepare_data(
    config: RunConfig,
    data_dir: str | None,
    device: torch.device,
    given: data.Datasets | None = None,
) -> data.Datasets:
    """Load the run's dataset (or take ``given`` in-memory data), apply subset and
    binarization, move it to ``device``."""
    dc = config.data
    if dc.dataset == data.ARRAYS:
        if given is None:
            raise RunError(
                "this run trains on data handed over in memory: pass the same arrays again "
                "(fflab.train(..., data=...))"
            )
        if dc.validation and given.validation is None:
            raise ConfigError("data.validation needs a validation split (x_val, y_val)")
        ds = given if dc.validation else dataclasses.replace(given, validation=None)
    elif given is not None:
        raise ConfigError(f"data.dataset={dc.dataset} reads files; in-memory data needs arrays")
    else:
        ds = data.load(dc.dataset, data_dir, validation=dc.validation)
    if dc.train_subset or dc.test_subset:
        tr, te = dc.train_subset or len(ds.train), dc.test_subset or len(ds.test)
        ds = data.Datasets(
            data.Split(ds.train.x[:tr], ds.train.y[:tr]),
            data.Split(ds.test.x[:te], ds.test.y[:te]),
            ds.validation,
            ds.image_shape,
            ds.num_classes,
        )
    if dc.binarize != "none":
        g = torch.Generator().manual_seed(dc.binarize_seed)

        def b(s: data.Split | None) -> data.Split | None:
            return None if s is None else data.Split(data.binarize(s.x, dc.binarize, g), s.y)

        ds = data.Datasets(
            b(ds.train), b(ds.test), b(ds.validation), ds.image_shape, ds.num_classes
        )
    return ds.to(device)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch + 1)
    return g


def build_experiment(
    config: RunConfig,
    data_dir: str | None,
    device: torch.device,
    given: data.Datasets | None = None,
) -> Experiment:
    ds = prepare_data(config, data_dir, device, given)
    init = torch.Generator().manual_seed(config.seed)
    try:
        return ALGORITHMS[config.algorithm].build(config, ds, device, init)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _environment(device: torch.device, comm: distributed.Comm | None = None) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    env = {
        "device": str(device),
        "device_name": name or platform.machine(),
        "torch_version": torch.__version__,
        "fflab_version": fflab.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if comm is not None:
        env.update(world_size=comm.world_size, backend=torch.distributed.get_backend())
    return env


def _train_epoch(
    exp,
    epoch: int,
    seed: int,
    device: torch.device,
    out_dir: Path,
    progress: bool,
    comm: distributed.Comm | None = None,
) -> dict[str, Any]:
    """Train 0-based ``epoch`` under a progress bar; raise :class:`Diverged` if it blew up."""
    bar = tqdm(
        total=exp.samples_per_epoch,
        desc=f"epoch {epoch + 1}/{exp.epochs}",
        unit="img",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
        leave=False,
    )
    message = partial(diverged_message, epoch, out_dir)
    pipelined = hasattr(exp, "parallel_report")
    if comm is None or pipelined:  # a stage checks only at the epoch's end, with the others
        on_batch = BatchReporter(bar, exp.samples_per_epoch, message, check=not pipelined)
    else:
        on_batch = CollectiveReporter(bar, exp.samples_per_epoch, message, comm)
    try:
        m = exp.train_epoch(epoch, epoch_generator(seed, epoch, device), on_batch)
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if pipelined:
        m.update(exp.parallel_report())
    bad = not math.isfinite(m["loss"]) or not exp.parameters_finite()
    if comm is not None:
        bad = comm.any(bad)
    if bad:
        raise Diverged(diverged_message(epoch, out_dir, m["loss"]))
    return m


def train(
    config: RunConfig | None,
    out_dir: Path,
    *,
    device: torch.device,
    data_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
    datasets: data.Datasets | None = None,
    dist_timeout: float = distributed.DEFAULT_TIMEOUT,
    tensorboard: bool = False,
    parallel: str = "data",
    stages: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run in ``out_dir``; return its summary.

    ``tensorboard``: also write every epoch's metrics as TensorBoard scalars into
    ``out_dir/tensorboard`` (:mod:`fflab.tensorboard`).

    ``datasets``: in-memory data (:func:`fflab.data.from_arrays`) for a config whose
    ``data.dataset`` is ``arrays``; a resumed run must get the same data again (checked by
    fingerprint).

    Under ``torchrun`` every process calls this and trains its shards (:mod:`fflab.
    distributed`); ``dist_timeout`` is how many seconds a process waits for the others in a
    collective before the run stops. Rank 0 returns the summary, the others ``{"rank": r,
    "world_size": N}`` (they leave when training ends; rank 0 alone evaluates). ``parallel``:
    ``data`` (every rank a shard of every batch) or ``pipeline`` (every rank a block of
    layers, :mod:`fflab.pipeline`; ``stages``: layers per rank).
    """
    out_dir = Path(out_dir)
    try:
        comm = distributed.init(device, dist_timeout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except distributed.DistributedError as e:
        raise RunError(str(e)) from None
    if comm is None:
        if parallel != "data" or stages is not None:
            raise ConfigError(
                "--parallel pipeline and --stages need several processes: start fflab with "
                "torchrun --nproc-per-node N"
            )
        return _train(
            config, out_dir, device, data_dir, resume, progress, log, datasets, None, tensorboard
        )
    if not comm.lead:
        progress, log = False, lambda s: None
    try:
        return _train(
            config, out_dir, comm.device, data_dir, resume, progress, log, datasets, comm,
            tensorboard, (parallel, stages),
        )  # fmt: skip
    except distributed.DistributedError as e:
        raise RunError(
            f"{e}; the run stopped. The last checkpoint in {out_dir} is intact: continue with "
            f"fflab train --resume {out_dir}"
        ) from None
    finally:
        comm.close()


def _open_run(config: RunConfig | None, out_dir: Path, resume: bool) -> RunConfig:
    """The run's config: the one given, or when resuming the run directory's."""
    if resume:
        if not (out_dir / "config.json").is_file():
            raise RunError(f"{out_dir} is not a run directory (no config.json)")
        config = from_dict(json.loads((out_dir / "config.json").read_text()))
    elif (out_dir / CHECKPOINT).exists():
        raise RunError(f"{out_dir} already holds a run; use --resume {out_dir} or another --out")
    if config is None:
        raise ValueError("config is required unless resuming")
    return config


def _resume_state(
    out_dir: Path, resume: bool, fingerprint: str | None, device
) -> tuple[dict, dict] | None:
    """The (tensors, meta) of the checkpoint to resume from, if any."""
    ckpt_path = out_dir / CHECKPOINT
    if not (resume and ckpt_path.exists()):
        return None
    tensors, meta = checkpoint.load(ckpt_path, device)
    if meta.get("data_fingerprint") != fingerprint:
        raise RunError(f"{out_dir} was trained on other data than the data given to resume it")
    return tensors, meta


def _train(
    config: RunConfig | None,
    out_dir: Path,
    device: torch.device,
    data_dir: str | None,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
    datasets: data.Datasets | None,
    comm: distributed.Comm | None,
    tensorboard: bool = False,
    scheme: tuple[str, Sequence[int] | None] = ("data", None),
) -> dict[str, Any]:
    ckpt_path = out_dir / CHECKPOINT
    lead = comm is None or comm.lead
    data_fingerprint = None if datasets is None else data.fingerprint(datasets)
    # rank 0 reads the run directory and sends the config and checkpoint to the others
    errors = (RunError, ConfigError, CheckpointError, ValueError)
    if comm is None:
        config = _open_run(config, out_dir, resume)
    else:
        text = comm.from_lead(lambda: _open_run(config, out_dir, resume).to_json(), errors)
        config = from_dict(json.loads(text))

    def build() -> Experiment:
        exp = build_experiment(config, data_dir, device, datasets)
        if comm is not None:
            try:
                distributed.parallelize(config.algorithm, exp, comm, *scheme)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return exp

    if comm is None:
        exp = build()
    else:  # rank 0 first (it may download the dataset), then the others
        exp = comm.together(build if comm.lead else lambda: None)
        exp = comm.together(lambda: exp if comm.lead else build())
    if comm is None:
        state = _resume_state(out_dir, resume, data_fingerprint, device)
    else:
        cpu = torch.device("cpu")
        load = partial(_resume_state, out_dir, resume, data_fingerprint, cpu)
        state = comm.from_lead(load, errors)
        if state is not None:
            state = ({k: v.to(device) for k, v in state[0].items()}, state[1])
    start_epoch, train_seconds, wall_seconds = 0, 0.0, 0.0
    metrics = []
    if state is not None:
        tensors, meta = state
        exp.load_state_tensors(tensors, meta)
        start_epoch = int(meta["epochs_done"])
        train_seconds, wall_seconds = meta["train_seconds"], meta["wall_seconds"]
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        log(f"run directory: {out_dir}")
        if state is not None:
            log(f"resuming {out_dir} after epoch {start_epoch} of {exp.epochs}")
            written = state[1].get("world_size", 1)
            if comm is not None and written != comm.world_size:
                log(f"  (written by {written} processes, now {comm.world_size})")
            metrics = [
                m for m in _read_jsonl(out_dir / "metrics.jsonl") if m["epoch"] <= start_epoch
            ]
        if start_epoch < exp.epochs:
            (out_dir / "summary.json").unlink(missing_ok=True)  # it described an earlier state
        checkpoint.atomic_write_text(out_dir / "config.json", config.to_json())
        checkpoint.atomic_write_text(
            out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics)
        )
    if comm is not None and hasattr(exp, "parallel_report"):
        split = "+".join(map(str, exp.trainer.stages))
        log(f"layer pipeline: {comm.world_size} processes ({split} layers), {comm.device.type}")
    elif comm is not None:
        log(f"data-parallel: {comm.world_size} processes, {comm.device.type}")
    board = None
    if tensorboard and lead:
        from fflab.tensorboard import ScalarLog

        try:
            board = ScalarLog(out_dir, history=metrics)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None

    for epoch in range(start_epoch, exp.epochs):
        t0 = time.perf_counter()
        m = _train_epoch(exp, epoch, config.seed, device, out_dir, progress, comm)
        dt = time.perf_counter() - t0
        train_seconds += dt
        if (epoch + 1) % config.data.eval_every == 0 or epoch + 1 == exp.epochs:
            m.update(exp.epoch_evaluation())  # every rank: the replicas stay equal
        wall_seconds += time.perf_counter() - t0
        m = {
            "epoch": epoch + 1,
            "seconds": dt,
            "samples_per_second": exp.samples_per_epoch / dt,
            "wall_seconds": wall_seconds,
            **m,
        }
        tensors, meta = exp.state_tensors()  # every rank (an RBM's chains are gathered)
        if not lead:
            continue
        meta.update(epochs_done=epoch + 1, train_seconds=train_seconds, wall_seconds=wall_seconds)
        if data_fingerprint is not None:
            meta["data_fingerprint"] = data_fingerprint
        if comm is not None:
            meta["world_size"] = comm.world_size
        checkpoint.save(ckpt_path, tensors, meta)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        if board is not None:
            board.epoch(m)
        shown = {
            k: v
            for k, v in m.items()
            if not k.startswith(("goodness", "loss_", "dead_", "always_on_"))
        }
        log(
            "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
            )
        )

    if board is not None:
        board.close()
    if not lead:
        return {"rank": comm.rank, "world_size": comm.world_size}
    t0 = time.perf_counter()
    results = exp.evaluate()
    wall_seconds += time.perf_counter() - t0
    summary = {
        **results,
        "epochs": exp.epochs,
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,
        "train_samples_per_second": exp.epochs * exp.samples_per_epoch / max(train_seconds, 1e-9),
        "seed": config.seed,
        "preset": config.preset,
        "algorithm": config.algorithm,
        "dataset": config.data.dataset,
        **_environment(device, comm),
    }
    if comm is not None:
        summary["parallel"] = scheme[0]
    checkpoint.atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def evaluate_run(
    run_dir: Path,
    *,
    device: torch.device,
    data_dir: str | None = None,
    datasets: data.Datasets | None = None,
) -> dict[str, Any]:
    """Re-evaluate the checkpoint of a run directory on the test set (``datasets``: the
    in-memory data of an ``arrays`` run)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.json)")
    config = from_dict(json.loads((run_dir / "config.json").read_text()))
    exp = build_experiment(config, data_dir, device, datasets)
    tensors, meta = checkpoint.load(run_dir / CHECKPOINT, device)
    exp.load_state_tensors(tensors, meta)
    return {**exp.evaluate(), "epochs_done": meta["epochs_done"], **_environment(device)}
