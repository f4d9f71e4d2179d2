"""Per-epoch metrics as TensorBoard scalars (optional: ``pip install 'fflab[tensorboard]'``).

The run loop writes every epoch's ``metrics.jsonl`` line here too when asked (``fflab train
--tensorboard``, ``fflab.train(..., tensorboard=True)``), into ``RUN_DIR/tensorboard``; view
with ``tensorboard --logdir RUN_DIR``. A resumed run rewrites the event log from the
epochs of ``metrics.jsonl`` it keeps (dropping whatever was logged after its checkpoint, or
filling in what an interruption lost), so the curves always match ``metrics.jsonl``.
"""

from __future__ import annotations

import re
from pathlib import Path

_LAYER = re.compile(r"^(loss|dead|always_on)_(\d+)$")
_GOODNESS = re.compile(r"^goodness_(pos|neg)_(\d+)$")


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics key, grouped by kind (loss, goodness, error, ...)."""
    if key == "loss":
        return "loss/total"
    if m := _LAYER.match(key):
        kind = "loss" if m[1] == "loss" else "units"
        name = "" if m[1] == "loss" else f"{m[1]}_"
        return f"{kind}/{name}layer{m[2]}"
    if m := _GOODNESS.match(key):
        side = "positive" if m[1] == "pos" else "negative"
        return f"goodness/layer{m[2]}/{side}"
    if "error" in key or "logprob" in key:
        return f"eval/{key}"
    if key in ("samples_per_second", "seconds", "wall_seconds"):
        return f"speed/{key}"
    return f"train/{key}"


class ScalarLog:
    """A SummaryWriter on ``RUN_DIR/tensorboard``, starting from the epochs ``history`` (the
    metrics rows a resumed run keeps)."""

    def __init__(self, run_dir: Path, history: list[dict] = ()) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'fflab[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=1)
        for row in history:
            self.epoch(row)

    def epoch(self, metrics: dict) -> None:
        """Write one epoch's numeric metrics at step ``metrics["epoch"]``."""
        step = int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
