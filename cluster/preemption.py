"""SIGTERM in a Ray Train worker: finish the step, checkpoint it on every rank, then stop.

Ray Train V2 runs the training function in a thread of the worker actor, and the actor's main
thread installs Ray's own SIGTERM handler (``ray._private.worker.Worker.main_loop``), which exits
the process at once: Ray then tears the worker group down before the other ranks could join a
checkpoint. ``defer_sigterm`` is a ``worker_process_setup_hook`` (it runs on the main thread of
every Ray Train worker process, before the main loop): it wraps the handler Ray is about to
install so that, while a training loop is running in the process, SIGTERM only raises a flag.
The trainer reads the flag at its next step boundary (all ranks agree on it), checkpoints and
stops; the process then ends with the worker group. If no trainer takes the notice within the
grace period, Ray's handler runs as before. Outside a training loop SIGTERM behaves as in Ray.

Signals belong to the process, so this module keeps process-wide state, on purpose and only here.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("fr_train.preemption")

_requested = threading.Event()
_active = threading.Event()
_grace_s = [120.0]


def sigterm_requested() -> bool:
    """True once this process received SIGTERM while a training loop was running."""
    return _requested.is_set()


def sigterm_reason() -> str | None:
    """The Trainer's ``external_stop``: "SIGTERM" once one was deferred in this process, else None."""
    return "SIGTERM" if _requested.is_set() else None


@contextmanager
def training_active(grace_s: float) -> Iterator[None]:
    """Marks a training loop as running in this process: SIGTERM is deferred to it meanwhile."""
    _grace_s[0] = grace_s
    _requested.clear()
    _active.set()
    try:
        yield
    finally:
        _active.clear()
        if _requested.is_set():  # checkpointed and stopped: now exit as SIGTERM asked (Ray's handler)
            _requested.clear()
            _thread.interrupt_main(signal.SIGTERM)


def _deferring(ray_handler: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
    def handler(signum: int, frame: Any) -> Any:
        if _active.is_set() and not _requested.is_set():
            _requested.set()
            log.warning("SIGTERM: the training loop checkpoints at its next step and stops (Ray's exit deferred "
                        "up to %.0fs)", _grace_s[0])

            # If the loop has not stopped by then, Ray's handler exits the process after all.
            timer = threading.Timer(_grace_s[0], _thread.interrupt_main, args=(signal.SIGTERM,))
            timer.daemon = True
            timer.start()
            return None
        return ray_handler(signum, frame)

    return handler


def defer_sigterm() -> None:
    """``worker_process_setup_hook`` of Ray Train workers (cluster/launch.py)."""
    try:
        import ray._private.utils as ray_utils

        install = ray_utils.set_sigterm_handler
    except (ImportError, AttributeError):  # another Ray: keep its behaviour, say so
        log.warning("this Ray has no ray._private.utils.set_sigterm_handler: SIGTERM exits workers without a "
                    "checkpoint (the newest periodic one is used)")
        return
    if getattr(install, "_fr_train_wrapped", False):
        return

    def set_sigterm_handler(ray_handler: Callable[[int, Any], Any]) -> None:
        install(_deferring(ray_handler))

    set_sigterm_handler._fr_train_wrapped = True  # type: ignore[attr-defined]
    ray_utils.set_sigterm_handler = set_sigterm_handler
