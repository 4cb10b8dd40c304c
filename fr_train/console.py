"""fr_train's one logger: every line a user reads goes through ``logging.getLogger("fr_train")``
(or a child, ``fr_train.checkpoint`` …) and is printed once, as ``[fr_train] message`` on stdout.

Why stdout and one handler: under Ray the worker's stdout is what reaches the driver's console and
``ray job logs``; a second path (a progress bar, the root logger, print) printed every line twice.
The handler writes to whatever ``sys.stdout`` is at the moment of the call, so captured output
(tests, Ray's redirection) sees it.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("fr_train")


class _Stdout(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # a closed stream must not take the run down
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        # Every line of a multi-line message is an fr_train line (the console reads as one stream).
        return "\n".join(f"[fr_train] {level}{line}" for line in record.getMessage().splitlines() or [""])


def setup_console(level: int = logging.INFO) -> logging.Logger:
    """Attach the one console handler to the ``fr_train`` logger (idempotent; per process)."""
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        handler = _Stdout()
        handler.setFormatter(_Format())
        log.addHandler(handler)
    log.setLevel(level)
    # Records still propagate to the root logger: it has no console handler in fr_train's own processes,
    # so nothing prints twice, and log capture (pytest's caplog, a user's file handler on the root)
    # keeps seeing fr_train's records. Where the root does print (Ray's workers), see printed_here_only.
    return log


def printed_here_only() -> None:
    """In a process whose root logger prints to the console itself (a Ray worker: Ray attaches its own
    handler), fr_train's records stop at the ``fr_train`` handler instead of printing a second time."""
    log.propagate = False
