"""Data-parallel training (fflab.distributed) on 2 gloo processes against one process.

Every process is a subprocess running this file as a script (``python test_distributed.py
CASE OUT``) with the environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE: the test holds the rendezvous store,
as torchrun's agent does, so no rank hosts it), one thread each, in float64, on synthetic
data (no download). The one-process reference is the same script without that environment:
the ordinary, non-distributed run (fused FF step, one negative source, one set of chains).

Tolerance: float64 weights of the 2-process run must equal the reference's to rtol 1e-9 /
atol 1e-12. The only legitimate difference is the order of float summations (a gradient
summed as two half-batch products plus an all-reduce instead of one product; a smoothed
gradient folded by a GEMM instead of added after it): a relative 1e-16 per operation, which
about 30 steps on these tiny nets leave below 1e-13 (measured: at most 1e-14 absolute). Any
real mismatch (one random draw kept by the wrong rank, one batch mean not reduced, a
gradient weighted 1/2 instead of 23/45) moves weights by 1e-4 or more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve()

# name -> (preset, settings on top); batch_size 45 on 300 rows: ranks of 2 get 23 and 22 rows,
# the last batch (30 rows) 15 each
_SIZES = {"in_features": 64, "num_classes": 10}
CASES: dict[str, tuple[str, dict]] = {
    "ff-supervised": (
        "smoke",
        {
            "model": {**_SIZES, "label_mode": "concat", "hidden": [24, 16]},
            "train": {"negatives": "hard", "dropout": 0.2, "input_dropout": 0.1, "epochs": 2},
        },
    ),
    "ff-unsupervised": (
        "smoke-unsup",
        {
            "model": {**_SIZES, "image_shape": [1, 8, 8], "hidden": [24, 16]},
            "train": {
                "epochs": 1,  # per layer: greedy, so layer 0 rests in epoch 2
                "layer_schedule": "greedy",
                "dropout": 0.2,
                "blurs": 2,
                "hybrid_different_class": True,
                "probe_epochs": 1,
            },
        },
    ),
    "bp-sgd": ("mnist-bp", {"model": {**_SIZES, "hidden": [24, 16]}, "train": {"epochs": 2}}),
    "bp-adam": (
        "mnist-bp",
        {"model": {**_SIZES, "hidden": [24, 16]}, "train": {"epochs": 2, "optimizer": "adam"}},
    ),
    "rbm-cd2": (
        "rbm-smoke",
        {"model": {"n_visible": 64, "n_hidden": 12}, "train": {"k": 2, "ais_betas": 50}},
    ),
    "rbm-pcd": (
        "rbm-smoke",
        {
            "model": {"n_visible": 64, "n_hidden": 12},
            "train": {"persistent": True, "ais_betas": 50, "epochs": 3},
        },
    ),
}
# the layer pipeline's cases (tests/test_pipeline.py); '_run' says how to launch them
_SUPERVISED = {
    "model": {**_SIZES, "label_mode": "concat", "hidden": [24, 16, 12], "peer_norm": 0.03},
    "train": {"negatives": "random", "dropout": 0.2, "input_dropout": 0.1, "epochs": 2},
}
PIPE_CASES = {
    # three stages: a first, a middle and a last stage, all with dropout draws to replay
    "pipe-supervised": ("smoke", {**_SUPERVISED, "_run": {"parallel": "pipeline"}}),
    "pipe-supervised-head1": (
        "smoke",
        {
            "model": {**_SUPERVISED["model"], "head_from": 1},
            "train": {**_SUPERVISED["train"], "optimizer": "adam", "lr": 0.001},
            "_run": {"parallel": "pipeline", "stages": [2, 1]},
        },
    ),
    "pipe-unsupervised": (
        "smoke-unsup",
        {
            "model": {**_SIZES, "image_shape": [1, 8, 8], "hidden": [24, 16, 12]},
            "train": {
                "epochs": 1,  # per layer, greedy: every stage rests in some epoch
                "layer_schedule": "greedy",
                "dropout": 0.2,
                "blurs": 2,
                "probe_epochs": 1,
            },
            "_run": {"parallel": "pipeline", "stages": [1, 2]},
        },
    ),
    "pipe-hard": (
        "smoke",
        {
            "model": {**_SIZES, "label_mode": "concat", "hidden": [24, 16]},
            "train": {"negatives": "hard"},
            "_run": {"parallel": "pipeline"},
        },
    ),
    "pipe-bad-stages": (
        "smoke",
        {**_SUPERVISED, "_run": {"parallel": "pipeline", "stages": [2, 2]}},
    ),
}
PIPE_CASES["pipe-long"] = (
    "smoke",
    {
        "model": {**_SIZES, "label_mode": "concat", "hidden": [24, 16]},
        "train": {"negatives": "random", "epochs": 8},
        "_run": {"parallel": "pipeline"},
    },
)
CASES.update(PIPE_CASES)
# a longer run for the tests that stop a rank mid-run
CASES["ff-long"] = (
    "smoke",
    {
        "model": {**_SIZES, "label_mode": "concat", "hidden": [24, 16]},
        "train": {"negatives": "hard", "epochs": 8},
    },
)


# -- the worker ----------------------------------------------------------------------------------
def synthetic():
    """300 training and 100 test rows of 64 features in [0, 1] (8 x 8 images), 10 classes,
    float64: noisy copies of 10 random prototypes."""
    from fflab.data import Datasets, Split

    g = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 64, generator=g, dtype=torch.float64)

    def split(n: int) -> Split:
        y = torch.randint(0, 10, (n,), generator=g)
        noise = torch.randn(n, 64, generator=g, dtype=torch.float64)
        return Split((protos[y] + 0.3 * noise).clamp_(0, 1), y)

    return Datasets(split(300), split(100), None, (8, 8), 10)


def worker(case: str, out: str, resume: bool, timeout: float, sleep: float) -> int:
    """Train ``case`` into ``out`` as the CLI does (one-line error, exit 1)."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from fflab import presets, runs
    from fflab.config import ConfigError

    preset, settings = CASES[case]
    settings = {k: dict(v) for k, v in settings.items()}
    scheme = settings.pop("_run", {})  # how to run under the launcher (pipeline cases)
    if "WORLD_SIZE" not in os.environ:
        scheme = {}
    data = settings.setdefault("data", {})
    data["dataset"] = "arrays"
    settings["train"]["batch_size"] = 45
    config = None if resume else presets.resolve(preset, settings, seed=3)
    if sleep:  # a pause after every epoch, so that a test can stop a rank mid-run
        train_epoch = runs._train_epoch

        def slow(*args, **kwargs):
            m = train_epoch(*args, **kwargs)
            time.sleep(sleep)
            return m

        runs._train_epoch = slow
    try:
        runs.train(
            config,
            Path(out),
            device=torch.device("cpu"),
            resume=resume,
            progress=False,
            datasets=synthetic(),
            dist_timeout=timeout,
            **scheme,
        )
    except ConfigError as e:
        print(f"fflab: error: {e}", file=sys.stderr)
        return 2
    except runs.RunError as e:
        print(f"fflab: {e}", file=sys.stderr)
        return 1
    return 0


# -- launching -------------------------------------------------------------------------------------
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Launch(list):
    """The processes of one launch, and the rendezvous store they meet at (held here, in the
    launcher, as ``torchrun``'s agent holds it: no rank hosts it)."""

    store = None


def launch(case: str, outs: list[Path], *, resume=False, timeout=60.0, sleep=0.0) -> Launch:
    """One process per entry of ``outs`` (each rank's --out); one process: no launcher env.

    Several processes meet as under ``torchrun``: the store is this process's, and the ranks
    find it through ``TORCHELASTIC_USE_AGENT_STORE``.
    """
    world = len(outs)
    procs = Launch()
    if world > 1:
        procs.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    for rank, out in enumerate(outs):
        # PYTHONFAULTHANDLER: a rank that crashes in native code prints its Python stack
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        for key in (*LAUNCH_ENV, "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(key, None)
        if world > 1:
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(procs.store.port),
                TORCHELASTIC_USE_AGENT_STORE="True",
            )
        cmd = [sys.executable, str(HERE), case, str(out), str(timeout), str(sleep)]
        if resume:
            cmd.append("--resume")
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def finish(procs: Launch, timeout: float = 120.0) -> list[tuple[int, str]]:
    """Wait for every process (killing all if one overruns); (return code, stderr) each."""
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def checkpoint_of(run: Path) -> tuple[dict, dict]:
    from fflab import checkpoint, runs

    return checkpoint.load(run / runs.CHECKPOINT)


def assert_same_weights(a: Path, b: Path) -> float:
    """The checkpoints of runs a and b hold the same tensors to the stated tolerance; returns
    the largest absolute difference of a floating tensor."""
    ta, ma = checkpoint_of(a)
    tb, mb = checkpoint_of(b)
    assert ma["epochs_done"] == mb["epochs_done"]
    assert ta.keys() == tb.keys()
    worst = 0.0
    for k in ta:
        if ta[k].is_floating_point():
            assert ta[k].dtype == torch.float64, k
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-9, atol=1e-12, msg=k)
            worst = max(worst, float((ta[k] - tb[k]).abs().max()) if ta[k].numel() else 0.0)
        else:
            assert torch.equal(ta[k], tb[k]), k
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run directories of the one-process runs, made on first use."""
    root, made = tmp_path_factory.mktemp("one-process"), {}

    def get(case: str) -> Path:
        if case not in made:
            out = root / case
            [(rc, err)] = finish(launch(case, [out]))
            assert rc == 0, err
            made[case] = out
        return made[case]

    return get


# -- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c != "ff-long" and c not in PIPE_CASES])
def test_two_processes_end_with_the_weights_of_one(case, reference, tmp_path):
    """Same seed, same global batch: 2 processes end where 1 does, and only rank 0 writes."""
    lead, other = tmp_path / "run", tmp_path / "rank1-out"
    results = finish(launch(case, [lead, other]))
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank}: {err}"
    assert not other.exists()  # rank 1 was handed another --out and never touched it
    one = reference(case)
    assert_same_weights(lead, one)
    assert sorted(p.name for p in lead.iterdir()) == sorted(p.name for p in one.iterdir())
    m2 = [json.loads(s) for s in (lead / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(s) for s in (one / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-9)
    summary = json.loads((lead / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert checkpoint_of(lead)[1]["world_size"] == 2


def test_a_full_buffer_is_reduced_while_the_step_goes_on():
    """GradBuckets.unit_done starts a buffer's all-reduce as soon as all its units are done
    (never the last buffer, which carries the extras), weighted once; reduce_ waits for it
    and reduces the rest. One gloo process: the sum over ranks is the value itself."""
    import torch.distributed as dist

    from fflab.distributed import Comm, GradBuckets

    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]  # 16 bytes each
    buckets = GradBuckets([[p] for p in params], extra=2, bucket_bytes=16)
    assert len(buckets.buckets) == 3
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm = Comm(rank=0, world_size=1, device=torch.device("cpu"), timeout=10.0)
        buckets.bind()
        for k, p in enumerate(params):
            p.grad.copy_(torch.full((4,), float(k + 1)))
        buckets.unit_done(0, comm, 0.5)
        assert list(buckets._launched) == [0]  # in flight while units 1 and 2 compute
        buckets.unit_done(2, comm, 0.5)  # the last buffer waits for reduce_
        assert list(buckets._launched) == [0]
        out = buckets.reduce_(comm, 0.5, None, torch.tensor([4.0, 6.0]))
        assert buckets._launched == {} and buckets._done == set()
        assert [p.grad.tolist() for p in params] == [[0.5] * 4, [1.0] * 4, [1.5] * 4]
        assert out.tolist() == [2.0, 3.0]
    finally:
        dist.destroy_process_group()


def test_a_batch_smaller_than_the_world_is_a_usage_error(tmp_path):
    """Batches of 45 on 300 samples leave 30 in the last batch: 2 processes share them all,
    but 271 samples leave a last batch of 1 row, and batches of 1 row cannot be shared."""
    from fflab.distributed import Comm, check_batches

    comm = Comm(rank=0, world_size=2, device=torch.device("cpu"), timeout=1.0)
    check_batches(300, 45, comm)
    with pytest.raises(ValueError, match="at least 2 rows in every batch.* a batch of 1$"):
        check_batches(271, 45, comm)
    with pytest.raises(ValueError, match="at least 2 rows"):
        check_batches(300, 1, comm)


def test_unsupported_algorithms_say_so():
    from fflab.distributed import Comm, parallelize

    comm = Comm(rank=0, world_size=2, device=torch.device("cpu"), timeout=1.0)
    with pytest.raises(ValueError, match="supports the algorithms ff, bp, rbm; bm runs in one"):
        parallelize("bm", object(), comm)


def test_cli_under_a_launcher_needs_out(monkeypatch, capsys):
    from fflab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--preset", "smoke"]) == 2
    assert capsys.readouterr().err == "fflab: error: a run under torchrun needs --out RUN_DIR\n"


@pytest.mark.slow
def test_torchrun_trains_the_smoke_preset(mnist_dir, tmp_path):
    """``torchrun -m fflab train`` on 2 processes (float32, MNIST): rank 0 alone prints and
    writes, and the weights are those of ``python -m fflab train`` in one process up to
    float32 rounding. That rounding is not small here: the same run fused and unfused in one
    process already differs by 2.4e-4 in the first layer's weights (and 2e-3 in the running
    means), so the bound is 1e-3 / 1e-2; a wrong reduction (a gradient summed, not
    averaged) is off by 1e-1. Exactness is the float64 tests' job."""
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["train", "--preset", "smoke", "--data-dir", str(mnist_dir), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "fflab", *common, "--out", str(one)], env=env, check=True)
    launcher = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "fflab"]
    done = subprocess.run(
        [*launcher, *common, "--out", str(two)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test_error_goodness") == 1  # rank 0 alone reports
    ta, _ = checkpoint_of(one)
    tb, meta = checkpoint_of(two)
    assert meta["world_size"] == 2
    for k in ta:
        if k.startswith("model.layers") or k.startswith("model.head"):
            torch.testing.assert_close(tb[k], ta[k], atol=1e-3, rtol=0, msg=k)
        elif k.startswith("model.running_mean"):
            torch.testing.assert_close(tb[k], ta[k], atol=1e-2, rtol=0, msg=k)


def _wait_for_checkpoint(run: Path, procs, epochs: int, limit: float = 60.0) -> None:
    from fflab import checkpoint, runs

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a rank ended before it was stopped"
        try:
            if checkpoint.load(run / runs.CHECKPOINT)[1]["epochs_done"] >= epochs:
                return
        except checkpoint.CheckpointError:
            pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize(
    ("case", "victim", "how"),
    [
        ("ff-long", 1, signal.SIGKILL),
        ("ff-long", 0, signal.SIGKILL),
        ("ff-long", 1, signal.SIGSTOP),
        ("pipe-long", 1, signal.SIGKILL),  # the layer pipeline: rank 0 sends to rank 1
    ],
)
def test_a_lost_rank_stops_the_run_and_the_checkpoint_survives(
    case, victim, how, reference, tmp_path
):
    """A rank killed (or hung: SIGSTOP, caught by the 5 s process-group timeout) mid-run: the
    survivor exits 1 with a one-line message within seconds, the last checkpoint is intact,
    and resuming it with one process (another N) ends where one uninterrupted process does."""
    run = tmp_path / "run"
    procs = launch(case, [run, run], timeout=5.0, sleep=0.3)
    try:
        _wait_for_checkpoint(run, procs, epochs=2)
        t0 = time.monotonic()
        os.kill(procs[victim].pid, how)
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert survivor.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"rank {1 - victim} of 2: lost contact with the other processes" in lines[0]
    assert f"The last checkpoint in {run} is intact" in lines[0]
    assert waited < (30 if how == signal.SIGSTOP else 15), waited
    tensors, meta = checkpoint_of(run)
    assert 2 <= meta["epochs_done"] < 8
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    [(rc, err)] = finish(launch(case, [run], resume=True))
    assert rc == 0, err
    assert_same_weights(run, reference(case))


if __name__ == "__main__":
    case, out, timeout, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    from fflab.distributed import end_process

    end_process(worker(case, out, "--resume" in sys.argv[5:], timeout, sleep))


@pytest.mark.parametrize("launched", [False, True])
def test_end_process_exits_with_the_code_and_flushes_what_was_printed(launched):
    """Under a launcher the process ends by os._exit (no teardown: no atexit handler runs),
    with stdout and stderr flushed; otherwise by sys.exit (atexit handlers run)."""
    code = (
        "import atexit, sys\n"
        "from fflab.distributed import end_process\n"
        "atexit.register(lambda: print('teardown', file=sys.stderr))\n"
        "print('out', end=''); print('err', end='', file=sys.stderr)\n"
        "end_process(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    if launched:
        env.update(RANK="0", WORLD_SIZE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 3 and r.stdout == "out"
    assert r.stderr == ("err" if launched else "errteardown\n")
