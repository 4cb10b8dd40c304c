"""Which errors a restart can fix, and the record that stops Ray from retrying the others.

Why: Ray Train (2.60) retries every worker-group error up to ``FailureConfig.max_failures`` and has
no hook to call an error deterministic. A config error, a malformed dataset, a missing or
incompatible checkpoint, a NaN loss at the same step twice: each fails again after every restart
(on a GPU cluster, each rebuilds the worker group), and the user was left with Ray's traceback.
So a worker that meets such an error writes ``RUN/fatal.json`` (the error's one line) before it
raises; the restarted workers find the record and return at once, which Ray counts as the end of
the run (no more restarts); the driver reads the record and ends with that one line. Crashes,
preemptions and other errors keep Ray's retries. This module is the record's one home.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write_bytes

FATAL_NAME = "fatal.json"
NONFINITE_NAME = "nonfinite.json"  # the step of the last NaN loss: twice at one step is not a transient

# Errors of what the user gave (configuration, data, files, checkpoints): the same input fails the
# same way after a restart. ValueError covers ConfigError and DataFormatError.
_NOT_RETRYABLE: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
)
# Storage that cannot take the run's files: full, over quota, read-only. A restart writes the same
# checkpoint to the same place; the user must free space or pass another --storage.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_retryable(exc: BaseException, *, process_group_lost: bool = False) -> bool:
    """False for errors of the run's input, which a restart cannot fix; True for everything else
    (a crashed or killed process, a lost node, out of memory, a flaky filesystem).

    ``process_group_lost``: the worker's process group is gone while the run has several ranks.
    Ray Train destroys it when it stops a worker group (a resize, a lost node) while the training
    loop may still be running; the loop's next collective then raises torch's ``ValueError``
    ("Default process group has not been initialized"), which says nothing about the input: seen
    in the elastic and preemption tests under load, where it ended the run as "not retried"."""
    if process_group_lost:
        return True
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return False
    return not isinstance(exc, _NOT_RETRYABLE)


def one_line(exc: BaseException) -> str:
    """The error as one line: its type and its whole message, lines joined (ours name the file/key and
    the fix; a message's first line alone can be a mere heading, e.g. "PartialFC.forward: bad input:")."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}".strip()


def _write(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(record).encode())  # readers see the old record or the new one


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def record_fatal(run_dir: Path, exc: BaseException, rank: int) -> bool:
    """Best effort: on a full or read-only storage the record itself cannot be written (then Ray's
    retries run, and fail the same way). Returns whether it was written."""
    try:
        _write(run_dir / FATAL_NAME, {"error": one_line(exc), "type": type(exc).__name__, "rank": rank})
    except OSError as write_error:
        from fr_train.console import log

        log.info(f"rank {rank}: cannot record the error in {run_dir / FATAL_NAME} ({write_error}); Ray retries it")
        return False
    return True


def read_fatal(run_dir: Path) -> dict[str, Any] | None:
    return _read(run_dir / FATAL_NAME)


def nonfinite_again(run_dir: Path, step: int) -> bool:
    """Record a NaN loss at ``step``; True if the previous attempt had one at the same step."""
    previous = _read(run_dir / NONFINITE_NAME)
    _write(run_dir / NONFINITE_NAME, {"step": step})
    return previous is not None and previous.get("step") == step
