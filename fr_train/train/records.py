"""One step record and where it goes: ``train_log.jsonl`` (rank 0), the console line and progress
bar (rank 0), the Prometheus metrics (every rank) and the caller's report (cluster/worker.py plugs
in Ray's). The JSON-lines log is written by :func:`append_event` and read back by
:func:`read_events` (the run summary), so its schema has one home: events ``start``, ``train``,
``eval``, ``end``.

``RecordsMixin`` is a mixin of Trainer (fr_train/train/trainer.py); it uses the trainer's cfg,
rank, world, plan, engine, head, distill, state, schedule, metrics, format and log_path.
"""

from __future__ import annotations

import itertools
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fr_train.console import log
from fr_train.train import engine as eng
from fr_train.train.batch_plan import is_elastic
from fr_train.train.state import StepTimes

LOG_NAME = "train_log.jsonl"


def append_event(path: Path, event: dict[str, Any]) -> None:
    """One JSON line; lines are appended whole (one write), readers skip blank lines."""
    with Path(path).open("a") as f:
        f.write(json.dumps(event) + "\n")


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event of a run's log, in order ([] when there is none yet)."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RecordsMixin:
    def _write_event(self, event: dict[str, Any]) -> None:
        """Rank 0: one event to the log and to its other sinks (TensorBoard)."""
        append_event(self.log_path, event)
        if self.tensorboard is not None:
            self.tensorboard.write(event)

    def _observe(self, loss: float, times: StepTimes) -> None:
        step_s = max(times.total, 1e-9)
        grad_norm = self.grad_norm
        stats = self.head.step_stats()
        self.metrics.observe_step(
            step=self.state.step, epoch=self.state.epoch, loss=loss, lr=self.schedule.lr(max(self.state.step - 1, 0)),
            images_per_s_rank=self.plan.micro_batch * self.plan.grad_accum / step_s, images_per_s_global=self.global_batch / step_s,
            samples_seen=self.state.samples_seen, data_s=times.data, forward_s=times.forward,
            backward_s=times.backward, optimizer_s=times.optimizer, step_s=step_s,
            grad_norm=None if grad_norm is None else float(grad_norm),
            loss_scale=eng.loss_scale(self.engine, self.format) if self.precision == "fp16" else None,
            skipped_steps=int(self.engine.skipped_steps),
            sampled_classes=None if "sampled_classes" not in stats else int(stats["sampled_classes"]),
            vpl_injected_fraction=stats.get("vpl_injected_fraction"),
        )

    def _record(self, loss: float, times: StepTimes, images_per_s: float) -> dict[str, Any]:
        rec = {
            "time": round(time.time(), 3),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss,  # full precision: resumed runs are compared bitwise
            "lr": self.schedule.lr(self.state.step - 1),
            "images_per_s": round(images_per_s, 2),
            "step_time_s": round(times.total, 4),
            "data_s": round(times.data, 4),
            "forward_s": round(times.forward, 4),
            "backward_s": round(times.backward, 4),
            "optimizer_s": round(times.optimizer, 4),
            "samples_seen": self.state.samples_seen,
            "peak_memory_gib": round(eng.peak_memory_bytes(self.device) / 2**30, 3),
        }
        threshold = self.head.step_stats().get("unified_threshold")  # BCE / USS: the learned unified threshold
        if threshold is not None:
            rec["unified_threshold"] = round(threshold, 6)  # on the cosine scale
        if self.distill is not None:
            rec.update({f"distill_{k}": round(v, 6) for k, v in self.distill.last_terms.items()})
        remaining = self.total_steps - self.state.step
        rec["eta_s"] = round(remaining * self.global_batch / max(images_per_s, 1e-9), 1)
        self.state.history.append(rec)
        return rec

    def _emit(self, record: dict[str, Any], progress: Any) -> None:
        if self.rank == 0:
            self._write_event({"event": "train", **record})
            log.info(f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
                     f"lr {record['lr']:.4g} {record['images_per_s']:.1f} img/s eta {record['eta_s']:.0f}s")
            if progress is not None:
                progress.update(record["step"] - progress.n)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}",
                                     ips=f"{record['images_per_s']:.0f}")
        self.report({k: v for k, v in record.items() if isinstance(v, int | float)}, self._checkpoint_to_report())

    def _progress_bar(self) -> Any:
        """A tqdm bar on rank 0 when a person watches a terminal; none under Ray or in a log file,
        where each redraw would be one more line beside the step line (every step twice)."""
        if self.rank != 0 or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, desc=f"fr_train {self.cfg.run.name}", unit="step",
                    mininterval=5.0, dynamic_ncols=True)

    def _log_start(self) -> None:
        if self.rank != 0:
            return
        info = {
            "event": "start", "time": round(time.time(), 3), "run": self.cfg.run.name, "world_size": self.world, "device": str(self.device),
            "precision": self.precision, "channels_last": self.format.channels_last, "num_classes": self.num_classes, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "global_batch": self.global_batch, "micro_batch": self.plan.micro_batch,
            "grad_accum": self.plan.grad_accum, "step": self.state.step, "base_lr": self.schedule.base_lr,
            "backbone": self.cfg.backbone.name, "data_dir": str(self.data_dir),
            "backbone_gflops": round(self.backbone_flops / 1e9, 3),
            "host": socket.gethostname(),
            "run_directory": self.start.to_json(),  # resumed from, skipped checkpoints, replaced run
        }
        log.info(f"{self.cfg.backbone.name}: {info['backbone_gflops']} GFLOPs (2 × multiply-adds) forward per "
                 f"{self.image_size[0]}x{self.image_size[1]} image; {self.num_classes} classes over {self.world} "
                 f"rank(s); global batch {self.global_batch} ({self.plan.micro_batch} × {self.world} × "
                 f"{self.plan.grad_accum} accumulated); {self.total_steps} steps; {self.precision}"
                 f"{', channels_last' if self.format.channels_last else ''} on {self.device.type}")
        if is_elastic(self.cfg.run):
            self._observe_size(info["time"])
        self._write_event(info)

    def _observe_size(self, now: float) -> None:
        """Rank 0 of an elastic run, before its start event is written: how the size changed over the run
        (its earlier start events) and since when it trains below its largest size."""
        largest = self.cfg.run.num_workers
        starts = [(float(r["time"]), int(r["world_size"])) for r in read_events(self.run_dir)
                  if r.get("event") == "start" and "world_size" in r] + [(now, self.world)]
        resizes = {"shrink": 0, "grow": 0}
        for (_, before), (_, after) in itertools.pairwise(starts):
            if after != before:
                resizes["shrink" if after < before else "grow"] += 1
        since = 0.0
        for when, world in reversed(starts):
            if world >= largest:
                break
            since = when
        self.metrics.observe_size(largest, resizes, since, self.cfg.metrics.below_max_alert_minutes * 60)
        if starts[-2:-1] and starts[-2][1] != self.world:
            log.info(f"elastic run resized: {starts[-2][1]} -> {self.world} workers at step {self.state.step} "
                     f"(global batch {self.global_batch} kept: {self.plan.micro_batch} images × "
                     f"{self.plan.grad_accum} micro-batches per worker)")
