"""The run's curves as TensorBoard event files (``STORAGE/RUN/tensorboard/``): one more sink of the
events that ``train_log.jsonl`` records (fr_train/train/records.py keeps the one schema).

Why: a run on a laptop has no Prometheus or Grafana; every trainer this project is compared with
(arcface_torch, TFace, FaceX-Zoo) draws its curves with TensorBoard. ``tensorboard --logdir
STORAGE`` shows the runs of one storage side by side.

What goes where (rank 0 only, as the log):

- ``start``: the resolved config as text (``config``), and where the launch starts from;
- ``train``: every number of the step record as ``train/<field>`` (loss, lr, images/s, the step's
  parts, peak memory, samples seen, the unified threshold, distillation terms), at its step;
- ``eval``: ``eval/<set>/<field>`` (accuracy, its std, TAR@FAR at each FAR, the threshold);
- ``end``: flushed and closed.

A resumed or restarted launch continues the same curves: the writer opens with ``purge_step`` one
past the step it starts from, so TensorBoard drops the points a killed launch wrote after its last
checkpoint (the steps trained again) instead of showing the curve step back. The writer flushes
every 10 s: a killed launch loses at most that much, and those steps are trained again anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
FLUSH_S = 10
_NOT_CURVES = frozenset({"time", "step", "epoch", "event", "set", "eta_s"})


def _numbers(event: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in event.items()
            if k not in _NOT_CURVES and isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoardSink:
    """Writes the run's events to ``run_dir/tensorboard``; opened by the launch's ``start`` event."""

    def __init__(self, run_dir: Path, config_json: str) -> None:
        self.dir = Path(run_dir) / TENSORBOARD_DIR
        self.config_json = config_json
        self._writer: Any = None

    def write(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self._open(int(event.get("step", 0)))
            self._writer.add_text("config", f"```\n{self.config_json}\n```", global_step=int(event.get("step", 0)))
            return
        if self._writer is None:
            return
        step = int(event["step"])
        if kind == "train":
            for key, value in _numbers(event).items():
                self._writer.add_scalar(f"train/{key}", value, global_step=step, walltime=event.get("time"))
        elif kind == "eval":
            for key, value in _numbers(event).items():
                self._writer.add_scalar(f"eval/{event['set']}/{key}", value, global_step=step,
                                        walltime=event.get("time"))
            self._writer.flush()
        elif kind == "end":
            self.close()

    def _open(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard imports a lot

        self.close()
        # Steps after the one this launch starts from were written by a launch that did not keep them.
        # Written by every launch, the first included: TensorBoard takes the first session start it
        # reads for the run's beginning and purges only at later ones.
        self._writer = SummaryWriter(log_dir=str(self.dir), purge_step=start_step + 1, flush_secs=FLUSH_S)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
