"""FF's layer pipeline (fflab.pipeline) on 2 and 3 gloo processes against one process.

The processes are launched as in ``test_distributed.py`` (its worker and launcher; one thread
each, float64, synthetic data). A stage runs exactly the arithmetic one process runs on its
layers, on the same inputs, with the same random draws, so the weights must be *equal* to the
one-process run's, bit for bit: no summation is reordered (nothing is all-reduced during an
epoch; the end-of-epoch exchange copies tensors).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_distributed import (
    checkpoint_of,
    finish,
    launch,
)
from test_distributed import reference as reference  # noqa: F401 (the fixture)

from fflab.pipeline import check_stages, fill_drain_bubble, layer_costs, partition


def assert_equal_runs(a, b) -> None:
    ta, ma = checkpoint_of(a)
    tb, mb = checkpoint_of(b)
    assert ma["epochs_done"] == mb["epochs_done"]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize(
    "case, world", [("pipe-supervised", 3), ("pipe-supervised-head1", 2), ("pipe-unsupervised", 2)]
)
def test_the_pipeline_ends_with_the_weights_of_one_process(case, world, reference, tmp_path):
    runs = [tmp_path / "run", *(tmp_path / f"rank{r}-out" for r in range(1, world))]
    results = finish(launch(case, runs))
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank}: {err}"
    one = reference(case)
    assert_equal_runs(runs[0], one)
    m_pipe = [json.loads(s) for s in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    m_one = [json.loads(s) for s in (one / "metrics.jsonl").read_text().splitlines()]
    for mp, mo in zip(m_pipe, m_one, strict=True):
        for key, value in mo.items():
            if key not in ("seconds", "samples_per_second", "wall_seconds"):
                assert mp[key] == value, key  # losses, goodness, dead units: every layer's
        assert len(mp["pipeline_idle"]) == world
        assert all(0.0 <= f <= 1.0 for f in mp["pipeline_idle"])
        sent = mp["pipeline_bytes_per_step"]
        assert sent[-1] == 0 and all(s > 0 for s in sent[:-1])  # the last stage sends nothing
    sent_0 = sent[0]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["parallel"] == "pipeline" and summary["world_size"] == world
    if case == "pipe-supervised-head1":
        # stage 0 of [24, 16, 12] split 2 + 1, head on layers 1..: per batch of B rows it
        # sends layer 1's positive and negative activities (2B x 16) and its neutral ones
        # (B x 16; layer 0's are not read by the head): 48 B float64 numbers. 300 rows in
        # batches of 45: six of 45 and one of 30.
        assert m_pipe[0]["pipeline_stages"] == [2, 1]
        assert sent_0 == pytest.approx(48 * 8 * (6 * 45 + 30) / 7)


@pytest.mark.parametrize(
    "case, message",
    [
        ("pipe-hard", "cannot use negatives=hard: it reads the softmax head"),
        ("pipe-bad-stages", "must give every process at least one layer and add up to"),
    ],
)
def test_what_the_pipeline_cannot_do_is_a_usage_error(case, message, tmp_path):
    """Rank 0 builds the run first and says what is wrong (exit 2); rank 1 stops with it."""
    (rc0, err0), (rc1, err1) = finish(launch(case, [tmp_path / "run", tmp_path / "rank1-out"]))
    said = f"rank 0 ({rc0}): {err0}\nrank 1 ({rc1}): {err1}"
    assert rc0 == 2 and message in err0 and "Traceback" not in err0, said
    assert rc1 == 1 and "another process failed to set up the run" in err1, said


def test_pipeline_needs_a_launcher(capsys):
    from fflab.cli import main

    rc = main(["train", "--preset", "smoke", "--parallel", "pipeline", "--out", "/nonexistent"])
    assert rc == 2
    assert "need several processes: start fflab with torchrun" in capsys.readouterr().err


def test_partition_minimizes_the_largest_stage():
    assert partition([2.0, 5.0, 5.0], 2) == [2, 1]
    assert partition([1.0, 1.0, 1.0, 1.0], 2) == [2, 2]
    assert partition([6.0, 16.0, 16.0, 16.0], 4) == [1, 1, 1, 1]
    assert partition([6.0, 16.0, 16.0, 16.0], 2) == [2, 2]  # 22 | 32 beats 38 | 16
    assert partition([1.0, 9.0, 1.0], 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="between 1 and 3 layers"):
        partition([1.0, 1.0, 1.0], 4)


def test_layer_costs_count_the_products_of_a_step():
    from fflab.ff.model import FFNet, FFNetConfig

    sup = FFNet(FFNetConfig(hidden=[10, 6], in_features=20, num_classes=4, label_mode="concat"))
    # layer 0 (10 x 24): one shared forward and one gradient product; layer 1 (6 x 10): 3
    # forward rows (neutral, positive, negative) and 2 gradient rows
    assert layer_costs(sup) == [2 * 240, 5 * 60]
    unsup = FFNet(FFNetConfig(hidden=[10, 6], in_features=20, label_mode="none"))
    assert layer_costs(unsup) == [4 * 200, 4 * 60]


def test_check_stages_and_bubble():
    assert check_stages([2, 1], 3, 2) == [2, 1]
    with pytest.raises(ValueError, match="lists 3 stages for 2 processes"):
        check_stages([1, 1, 1], 3, 2)
    with pytest.raises(ValueError, match="at least one layer"):
        check_stages([3, 0], 3, 2)
    assert fill_drain_bubble(2, 600) == pytest.approx(1 / 601)
    assert fill_drain_bubble(1, 10) == 0.0
