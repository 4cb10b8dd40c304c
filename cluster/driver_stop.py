"""Ctrl-C or SIGTERM to the driver: every rank checkpoints its current step, then the run stops.

Why: Ray Train's ``TorchTrainer.fit`` answers SIGINT by aborting its controller, which kills the
workers wherever they are, and ``ray.init`` answers SIGTERM with ``sys.exit`` inside a Ray call
(exit 134 with an abort dump); both lost the steps since the last periodic checkpoint, while the
workers printed that they would checkpoint (issue 28). Here the driver runs ``fit`` in a thread
(Ray then installs no SIGINT handler of its own) and answers the first SIGINT/SIGTERM by writing
``RUN/stop_request.json``. Every worker polls that file at step boundaries (at most once a second),
the ranks agree on the stop (one all-reduce, fr_train/train/trainer.py), checkpoint the step
synchronously and return normally, so Ray ends the run instead of restarting it. The driver then
exits 130 (SIGINT) or 143 (SIGTERM), after one line naming the committed checkpoint. A second
signal stops at once, and says that the steps since the newest checkpoint will be repeated.

``ray job stop`` sends SIGTERM to the driver and SIGKILL ``RAY_JOB_STOP_WAIT_TIME_S`` (Ray's
default: 3 s) later: raise it on the cluster to at least a step plus a checkpoint's write time.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write_bytes
from fr_train.console import log

STOP_NAME = "stop_request.json"


def request_stop(run_dir: Path, signal_name: str) -> None:
    """The driver's stop request, for every worker of the run (the run directory is their shared storage)."""
    atomic_write_bytes(run_dir / STOP_NAME, json.dumps({"signal": signal_name, "time": time.time()}).encode())


def read_stop_request(run_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((run_dir / STOP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class StopRequestWatch:
    """On a worker: ``watch()`` is the reason to stop ("SIGINT to the driver") once the driver asked,
    else None. Reads the file at most every ``interval_s`` seconds (it may lie on network storage)."""

    def __init__(self, run_dir: Path, interval_s: float = 1.0) -> None:
        self.run_dir, self.interval_s = run_dir, interval_s
        self._next = 0.0
        self._reason: str | None = None

    def __call__(self) -> str | None:
        now = time.monotonic()
        if self._reason is None and now >= self._next:
            self._next = now + self.interval_s
            record = read_stop_request(self.run_dir)
            if record is not None:
                self._reason = f"{record.get('signal', 'a stop request')} to the driver"
        return self._reason


@dataclass
class FitOutcome:
    result: Any
    error: BaseException | None
    signal_name: str | None
    """The signal that stopped the run (SIGINT or SIGTERM), None when none came."""

    @property
    def exit_code(self) -> int:
        return 128 + int(signal.Signals[self.signal_name]) if self.signal_name else 0


def fit_until_signal(fit: Callable[[], Any], run_dir: Path, *,
                     on_force: Callable[[str], None]) -> FitOutcome:
    """Run ``fit`` (Ray Train's) in a thread; the main thread turns the first SIGINT/SIGTERM into a stop
    request and the second into ``on_force(signal name)`` (which should not return). Must be called on
    the main thread, after ``ray.init`` (whose SIGTERM handler this replaces meanwhile)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fit()
        except BaseException as exc:  # handed back to the caller as the run's error
            box["error"] = exc

    received: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received:
            on_force(name)
            return
        received.append(name)
        try:
            request_stop(run_dir, name)
        except OSError as exc:
            log.info(f"{name}: cannot write the stop request {run_dir / STOP_NAME} ({exc}); stopping at once")
            on_force(name)
            return
        log.info(f"{name}: every rank checkpoints its current step, then the run stops (send {name} again to "
                 "stop at once: the steps since the newest checkpoint would then be repeated)")

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # a short wait: signal handlers run on the main thread between waits
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return FitOutcome(box.get("result"), box.get("error"), received[0] if received else None)


def force_exit(code: int) -> None:
    """End the driver now (a second signal): no cleanup can be trusted to finish; a local Ray
    cluster shares the driver's fate and ends with it."""
    os._exit(code)
