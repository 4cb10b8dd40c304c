"""One launch at a time per run directory: ``RUN/owner.json`` names the live launch that owns it.

Why (issue 26, 2026-12-03): two launches of the same ``--name`` started a second apart both ran to
the end; the second set the first's newest checkpoint aside as "not on this run's timeline", and
both wrote ``final/`` and ``train_log.jsonl``. Nothing in a run directory is safe with two writers.

The record is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFS v3+), holds the
owner's host, pid, process start time and since-when, and is refreshed (its mtime) every
``HEARTBEAT_S`` by a thread of the owning driver while the launch lives. A record whose owner is
gone is taken over, so a crashed or SIGKILLed launch never leaves its run stuck:

* on the same machine (same hostname and kernel boot id), the owner is gone when no process has its
  pid with its start time: known at once, so "killed, then the same command" just works;
* on another machine (``ray job submit`` from elsewhere, a shared ``--storage``), liveness is not
  visible: the owner is gone once its heartbeat is older than ``STALE_AFTER_S``.

A taken-over record is renamed aside first and checked to be the one judged gone (else put back),
so two launches racing for one stale record cannot both win: only one ``O_EXCL`` create succeeds.
A launch refused here started nothing and wrote nothing.

This module is also the one home of what belongs to one launch only, which the next launch clears
once it owns the directory (:func:`clear_launch_records`): the fatal-error and NaN records (the user
may have fixed the cause), the driver's stop request, and the failed attempts counted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.driver_stop import STOP_NAME
from cluster.failures import FATAL_NAME, NONFINITE_NAME
from cluster.outcome import ATTEMPTS_NAME

OWNER_NAME = "owner.json"
LAUNCH_RECORDS = (FATAL_NAME, NONFINITE_NAME, STOP_NAME, ATTEMPTS_NAME)
"""Files in the run directory that describe one launch: the next one starts without them."""
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # 12 missed heartbeats: a driver that is alive refreshes well within this


class RunInUseError(ValueError):
    """Another live launch owns the run directory (a ValueError: the CLI prints one line, exit 1)."""


@dataclass(frozen=True)
class Owner:
    host: str
    boot_id: str
    pid: int
    pid_started: float  # the process's start time (psutil), so a reused pid is not taken for it
    since: str  # ISO 8601, UTC

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's live process
        return -1.0


def this_process() -> Owner:
    pid = os.getpid()
    return Owner(host=socket.gethostname(), boot_id=_boot_id(), pid=pid, pid_started=_process_started(pid) or 0.0,
                 since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def owner_is_gone(owner: Owner, heartbeat_age_s: float) -> bool:
    me = this_process()
    if owner.host == me.host and owner.boot_id == me.boot_id and owner.boot_id:
        started = _process_started(owner.pid)
        return started is None or (started >= 0 and abs(started - owner.pid_started) > 1.0)
    return heartbeat_age_s > STALE_AFTER_S


_UNREADABLE = Owner(host="?", boot_id="", pid=-1, pid_started=0.0, since="?")


def read_owner_file(path: Path) -> Owner | None:
    """The owner a record names; None when there is no file. A record that cannot be parsed (a
    launch killed while writing it) names an owner that is gone."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(raw)
        return Owner(host=str(fields["host"]), boot_id=str(fields["boot_id"]), pid=int(fields["pid"]),
                     pid_started=float(fields["pid_started"]), since=str(fields["since"]))
    except (ValueError, KeyError, TypeError):
        return _UNREADABLE


def read_owner(run_dir: Path) -> tuple[Owner, float] | None:
    """The run directory's recorded owner and its heartbeat's age in seconds; None when unowned."""
    path = run_dir / OWNER_NAME
    owner = read_owner_file(path)
    if owner is None:
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return owner, (float("inf") if owner == _UNREADABLE else age)


class RunOwnership:
    """Held by the driver for the whole launch (a context manager): the record, and its heartbeat."""

    def __init__(self, run_dir: Path, owner: Owner, took_over: Owner | None) -> None:
        self.run_dir = run_dir
        self.owner = owner
        self.took_over = took_over
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="fr_train-run-owner", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        path = self.run_dir / OWNER_NAME
        while not self._stop.wait(HEARTBEAT_S):
            # A storage hiccup: the next beat tries again (STALE_AFTER_S is 12 beats).
            with contextlib.suppress(OSError):
                os.utime(path)

    def release(self) -> None:
        """Remove the record if it is still this launch's (it is never someone else's to remove)."""
        self._stop.set()
        current = read_owner(self.run_dir)
        if current is not None and current[0] == self.owner:
            (self.run_dir / OWNER_NAME).unlink(missing_ok=True)

    def __enter__(self) -> RunOwnership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run(run_dir: Path, *, attempts: int = 3) -> RunOwnership:
    """Become the run directory's owner, or raise :class:`RunInUseError` naming the live owner.
    Creates the run directory (and its parents) when it does not exist yet."""
    run_dir.mkdir(parents=True, exist_ok=True)
    me = this_process()
    path = run_dir / OWNER_NAME
    took_over: Owner | None = None
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            recorded = read_owner(run_dir)
            if recorded is None:
                continue  # released between our create and our read: try again
            owner, age = recorded
            if not owner_is_gone(owner, age):
                raise RunInUseError(
                    f"{run_dir} is in use by another launch: {owner.describe()} (last heartbeat {age:.0f} s ago). "
                    f"Wait for it to end, stop it (Ctrl-C in its console, or `kill -TERM {owner.pid}` on "
                    f"{owner.host}), or pass another --name") from None
            aside = path.with_name(f"{OWNER_NAME}.gone-{me.pid}-{time.monotonic_ns()}")
            try:
                path.rename(aside)
            except FileNotFoundError:
                continue  # another launch took it over first: its create or ours wins below
            moved = read_owner_file(aside)
            if moved != owner:  # another launch replaced the stale record between our read and rename
                with contextlib.suppress(FileExistsError):  # a third launch created one meanwhile
                    os.link(aside, path)  # put its record back
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            took_over = owner
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(me), f)
            f.flush()
            os.fsync(f.fileno())
        return RunOwnership(run_dir, me, took_over)
    raise OSError(errno.EAGAIN, f"{path}: could not be claimed after {attempts} tries (launches racing for it)")


def clear_launch_records(run_dir: Path) -> None:
    """At a new launch, once it owns the directory: the records of the previous launch go."""
    for name in LAUNCH_RECORDS:
        (run_dir / name).unlink(missing_ok=True)
