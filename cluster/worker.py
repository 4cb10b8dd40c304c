"""The Ray Train entry of one worker: device, distributed facts, checkpoint reporting, Ray's
preemption notice, SIGTERM, and which errors end the run instead of restarting it.

Everything here knows Ray; the Trainer it runs (fr_train/train/trainer.py) does not.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster.failures import is_retryable, nonfinite_again, read_fatal, record_fatal
from fr_train.config import TrainConfig
from fr_train.console import printed_here_only
from fr_train.train.trainer import NonFiniteLossError, Trainer


class StoppedEarly(RuntimeError):
    """The run stopped before its last step on a SIGTERM, after checkpointing that step. Raised so
    that Ray Train restarts the workers (FailureConfig) instead of counting a finished run."""


def stop_on_sigterm(trainer: Trainer) -> Callable[[], None]:
    """On the main thread: SIGTERM → the trainer finishes its step, checkpoints it on every rank and
    stops. Returns the function that restores the previous handler. (Ray Train runs the loop in a
    thread; there cluster.preemption defers Ray's own handler instead.)"""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _ray_preemption_notice() -> str | None:
    """Ray Train's drain notice (a node of the run is being reclaimed), as one line, or None."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return None
    deadline = "no deadline" if not info.deadline_ms else "deadline " + time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.deadline_ms / 1000))  # absolute: the same notice stays equal
    return f"node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} (ranks {info.preempted_ranks}), {deadline}"


def _ray_train_reports_at(level: str) -> None:
    """Ray Train (2.60) logs "Reporting training result N: TrainingReport(...)" at INFO for every
    report, through a logger named by its file's path (``logging.getLogger(__file__)``), which its
    ``LoggingConfig`` (the ``ray.train`` logger) does not reach: one console line per logged step
    beside fr_train's own. That logger gets ``run.ray_log_level`` here (INFO brings the lines back)."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: runs on every worker with torch.distributed already initialised."""
    import ray
    import ray.train

    printed_here_only()  # Ray's workers log the root logger to the console too: one line, not two
    cfg = TrainConfig.from_dict(loop_config["config"])
    _ray_train_reports_at(cfg.run.ray_log_level)
    run_dir = Path(cfg.run.storage).expanduser() / cfg.run.name
    if read_fatal(run_dir) is not None:
        return  # an earlier attempt met an error no restart fixes: end here; the driver reports it
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if torch.cuda.is_available() and cfg.run.use_gpu != "no":
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        # Metrics only: a checkpoint handed to Ray lands in its snapshot, which goes stale once
        # fr_train prunes (cluster/ray_state.py). The committed checkpoint's path is a metric.
        ray.train.report(metrics if checkpoint is None else {**metrics, "checkpoint": str(checkpoint)})

    from cluster.driver_stop import StopRequestWatch, read_stop_request
    from cluster.preemption import sigterm_reason, training_active

    try:
        runtime = ray.get_runtime_context()
        # One launch: this Ray cluster's session and the driver's job. Ray's restarts of the workers
        # keep it, so a restart continues the launch's own checkpoints (Trainer, launch_id); the next
        # launch, even on a fresh local cluster whose job ids start again, has another session.
        launch_id = f"{runtime.get_session_name()}/{runtime.get_job_id()}"
        trainer = Trainer(cfg, rank, world, device, report=report, job_id=runtime.get_job_id(),
                          preemption_notice=_ray_preemption_notice, launch_id=launch_id)
        driver_stop = StopRequestWatch(run_dir)  # Ctrl-C / SIGTERM to the driver (cluster/driver_stop.py)
        # A SIGTERM to this worker (deferred by cluster.preemption.defer_sigterm), or the driver's request.
        trainer.external_stop = lambda: sigterm_reason() or driver_stop()
        uninstall = stop_on_sigterm(trainer)  # when this runs on the main thread (no Ray Train thread)
        try:
            with training_active(cfg.checkpoint.sigterm_grace_s):
                st = trainer.fit()
        finally:
            uninstall()
    except NonFiniteLossError as exc:
        if nonfinite_again(run_dir, exc.step):
            record_fatal(run_dir, exc, rank)  # the same step from the same checkpoint: not a transient
        raise
    except Exception as exc:
        group_lost = world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        if not is_retryable(exc, process_group_lost=group_lost):
            record_fatal(run_dir, exc, rank)
        raise
    if st.step < trainer.total_steps and read_stop_request(run_dir) is None:
        # A SIGTERM to workers (not the driver's stop): Ray restarts them and they resume.
        raise StoppedEarly(f"run {cfg.run.name} stopped at step {st.step} of {trainer.total_steps} on SIGTERM; its "
                           "checkpoint is committed and the restarted workers resume from it")
