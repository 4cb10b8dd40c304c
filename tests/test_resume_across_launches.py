"""A run resumes in any later launch of the same command: after fr_train pruned checkpoints, after
Ctrl-C or SIGTERM to the driver, after a SIGKILL of the driver, whatever Ray Train left in the run
directory; and ``--overwrite`` starts over on any run directory.

Issue 28: Ray Train's ``checkpoint_manager_snapshot.json`` listed the checkpoints fr_train had
pruned (``checkpoint.keep``), and every later launch failed with ``CheckpointManagerInitializationError``
while fr_train's line said "run the same command to resume"; Ctrl-C lost the steps since the last
periodic checkpoint and SIGTERM ended in an abort dump (exit 134). Through the real CLI and a real
local Ray cluster, as a user runs it: five launches of one run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster.driver_stop import (
    StopRequestWatch,
    fit_until_signal,
    read_stop_request,
    request_stop,
)
from cluster.failures import is_retryable
from cluster.launch import StorageError, check_storage_writable
from cluster.outcome import ATTEMPTS_NAME, AttemptCounter, failed_attempts, failure_line
from cluster.ray_state import RAY_SNAPSHOT, set_aside_ray_snapshot
from cluster.run_owner import clear_launch_records
from fr_train.checkpointing.rundir import CHECKPOINTS_DIR
from tests.test_faults import BIN
from tests.test_gpu_configuration_on_cpu import TINY
from tests.test_train_e2e import _env


# ------------------------------------------------------------------------------------------------
# The parts
# ------------------------------------------------------------------------------------------------
def test_a_ray_snapshot_of_any_content_is_set_aside_not_deleted(tmp_path: Path) -> None:
    assert set_aside_ray_snapshot(tmp_path) is None  # none: nothing to do
    for content in (b"", b'{"garbage', b'{"checkpoints": ["step_000000001"]}'):
        (tmp_path / RAY_SNAPSHOT).write_bytes(content)
        aside = set_aside_ray_snapshot(tmp_path)
        assert aside == tmp_path / (RAY_SNAPSHOT + ".set-aside") and aside.read_bytes() == content
        assert not (tmp_path / RAY_SNAPSHOT).exists()  # Ray, starting next, finds none


def test_a_stop_request_reaches_a_worker_once_and_belongs_to_one_launch(tmp_path: Path) -> None:
    watch = StopRequestWatch(tmp_path, interval_s=0.0)
    assert watch() is None and read_stop_request(tmp_path) is None
    request_stop(tmp_path, "SIGINT")
    assert watch() == "SIGINT to the driver" and read_stop_request(tmp_path)["signal"] == "SIGINT"
    clear_launch_records(tmp_path)  # the next launch
    assert read_stop_request(tmp_path) is None
    assert watch() == "SIGINT to the driver"  # a worker that saw it keeps stopping
    slow = StopRequestWatch(tmp_path, interval_s=3600.0)
    assert slow() is None
    request_stop(tmp_path, "SIGTERM")
    assert slow() is None  # read at most once per interval (the file may lie on network storage)


def _signal_me_after(delays: list[float], signum: int) -> threading.Thread:
    def send() -> None:
        for delay in delays:
            time.sleep(delay)
            os.kill(os.getpid(), signum)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_the_first_signal_to_the_driver_asks_the_workers_to_stop(tmp_path: Path) -> None:
    """``fit`` stands in for Ray Train's: it ends once it sees the stop request, as the workers do."""
    def fit() -> str:
        while read_stop_request(tmp_path) is None:
            time.sleep(0.05)
        return "result"

    _signal_me_after([0.3], signal.SIGINT)
    outcome = fit_until_signal(fit, tmp_path, on_force=lambda name: pytest.fail("one signal must not force"))
    assert (outcome.result, outcome.error, outcome.signal_name, outcome.exit_code) == ("result", None, "SIGINT", 130)
    assert read_stop_request(tmp_path)["signal"] == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handlers are back


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    forced: list[str] = []

    def fit() -> None:  # workers that never reach a step boundary
        while not forced:
            time.sleep(0.05)
        raise RuntimeError("torn down")

    _signal_me_after([0.3, 0.3], signal.SIGTERM)
    outcome = fit_until_signal(fit, tmp_path, on_force=forced.append)
    assert forced == ["SIGTERM"] and outcome.signal_name == "SIGTERM" and outcome.exit_code == 143
    assert isinstance(outcome.error, RuntimeError)  # fit's own error is handed back, not raised in the thread


def test_a_full_or_read_only_storage_is_not_retried() -> None:
    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        assert not is_retryable(OSError(code, os.strerror(code), "/runs/x/checkpoints/step_000000007"))
    assert is_retryable(OSError(errno.EIO, "Input/output error"))  # a flaky filesystem may recover


def test_a_storage_that_cannot_be_written_is_refused_before_anything_starts(tmp_path: Path) -> None:
    a_file = tmp_path / "runs"
    a_file.write_text("mine")
    with pytest.raises(StorageError, match=r"run.storage=.*is not a directory.*Pass --storage"):
        check_storage_writable(a_file, a_file / "r")
    assert a_file.read_text() == "mine"
    check_storage_writable(tmp_path / "new" / "runs", tmp_path / "new" / "runs" / "r")  # parents are made
    assert list((tmp_path / "new" / "runs").iterdir()) == []  # the probe is gone; no run directory yet


def test_attempts_are_counted_one_line_each(tmp_path: Path) -> None:
    counter = AttemptCounter(tmp_path / ATTEMPTS_NAME)
    assert failed_attempts(tmp_path / ATTEMPTS_NAME) == 0  # none yet: no file
    counter.after_exception(None, {1: RuntimeError("NCCL error"), 0: RuntimeError("peer gone")})
    counter.after_exception(None, {0: OSError(28, "No space left on device")})
    lines = (tmp_path / ATTEMPTS_NAME).read_text().splitlines()
    assert failed_attempts(tmp_path / ATTEMPTS_NAME) == 2 and json.loads(lines[0])["ranks"] == [0, 1]


def test_the_failure_line_counts_attempts_and_names_what_a_resume_would_do(tmp_path: Path) -> None:
    error = RuntimeError("Training failed.\nRuntimeError: NCCL error: unhandled system error")
    none = failure_line("r", tmp_path, error, attempts=1, max_failures=3, fatal=None)
    assert "after 1 attempt(s); run.max_failures=3 allows 4" in none and "NCCL error" in none
    assert "it has no checkpoint" in none and "starts it from step 0" in none
    fatal = failure_line("r", tmp_path, None, attempts=1, max_failures=3,
                         fatal={"error": "OSError: [Errno 28] No space left on device"})
    assert "not retried" in fatal and "No space left" in fatal
    before = failure_line("r", tmp_path, error, attempts=0, max_failures=3, fatal=None)
    assert "before a worker group ran" in before
    (tmp_path / CHECKPOINTS_DIR / "step_000000004").mkdir(parents=True)  # no manifest: not loadable
    broken = failure_line("r", tmp_path, error, attempts=4, max_failures=3, fatal=None)
    assert "none of its 1 checkpoint(s)" in broken and "refuses to start" in broken


# ------------------------------------------------------------------------------------------------
# Five launches of one run, through the CLI
# ------------------------------------------------------------------------------------------------
def _command(storage: Path, cache: Path, *args: str) -> list[str]:
    return [str(BIN / "fr_train"), "mbf", "arcface", "--storage", str(storage), "--name", "long",
            "--num-workers", "1", "--set", f"data.cache_dir={cache}", *[a for s in TINY for a in ("--set", s)],
            "--set", "data.batch_size=8", "--set", "eval.enabled=false", "--set", "run.export_onnx=false", *args]


def _steps(run_dir: Path) -> list[int]:
    root = run_dir / CHECKPOINTS_DIR
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*")) if root.is_dir() else []


class _Launch:
    """One launch in its own session (as a terminal runs it: Ctrl-C reaches its whole process group)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_for_checkpoint(self, run_dir: Path, at_least: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not (_steps(run_dir) and _steps(run_dir)[-1] >= at_least):
            assert self.proc.poll() is None, f"ended early: {self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no step_{at_least} in time: {self.text()[-3000:]}"
            time.sleep(0.3)

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self._out.close()
        return rc, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for_workers_to_end(sid: int, timeout: float = 60) -> None:
    """After a SIGKILL of the driver, its local Ray cluster's processes end on their own (their parent
    is gone); a new launch must not race a worker of the old one that is still writing (issue 26 locks
    the run directory). Ray's dashboard and runtime-env agents linger a minute more; they write nothing
    of the run's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if os.getsid(pid) == sid and not cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
                    alive.append(f"{pid} {cmd[:80]}")
            except OSError:
                pass
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes of the killed launch still alive after {timeout} s: {alive}")


def _fr_lines(text: str) -> list[str]:
    """fr_train's own lines printed by the driver (not the workers' forwarded ones)."""
    return [line for line in text.splitlines() if line.startswith("[fr_train] ")]


def _train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r.get("event") == "train"]


@pytest.mark.slow
def test_a_pruned_stopped_or_killed_run_resumes_in_the_next_launch(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache, storage = tmp_path_factory.mktemp("resume_cache"), tmp_path / "runs"
    run_dir = storage / "long"

    # 1. More checkpoints than checkpoint.keep=3: fr_train prunes step 1..3; Ray records none of them.
    first = _Launch(_command(storage, cache, "--max-steps", "6", "--set", "checkpoint.every_steps=1"),
                    _env(tmp_path), tmp_path / "l1.log")
    rc, out = first.finish()
    assert rc == 0, out[-3000:]
    assert _steps(run_dir) == [4, 5, 6] and not (run_dir / RAY_SNAPSHOT).exists(), out[-3000:]
    # A full disk left an older fr_train's Ray snapshot at 0 bytes: Ray refused every later launch.
    (run_dir / RAY_SNAPSHOT).write_bytes(b"")

    # 2. Train longer; Ctrl-C (SIGINT to the terminal's process group) mid-interval.
    longer = ("--max-steps", "400", "--set", "checkpoint.every_steps=5")
    second = _Launch(_command(storage, cache, *longer), _env(tmp_path), tmp_path / "l2.log")
    second.wait_for_checkpoint(run_dir, 10)
    os.killpg(second.proc.pid, signal.SIGINT)
    rc, out = second.finish(timeout=120)
    assert rc == 130, out[-3000:]
    assert "resumed from" in out and "step_000000006 at step 6" in out, out[-3000:]
    stop_step = _steps(run_dir)[-1]
    assert f"SIGINT to the driver at step {stop_step}: checkpointing this step" in out, out[-3000:]
    assert _fr_lines(out)[-1] == (f"[fr_train] run long stopped on SIGINT: the same command resumes from its newest "
                                  f"checkpoint {run_dir / CHECKPOINTS_DIR / f'step_{stop_step:09d}'} (step {stop_step})")
    assert (run_dir / (RAY_SNAPSHOT + ".set-aside")).read_bytes() == b""  # set aside, named in the log
    assert "set aside Ray Train's checkpoint list" in out
    assert "Reporting training result" not in out  # Ray Train's per-report line (issue 25), at run.ray_log_level

    # 3. The same command resumes at the stop step exactly (no step trained twice); garbage in Ray's
    # snapshot does not matter; then the driver is SIGKILLed, as a crash or a lost head node does.
    (run_dir / RAY_SNAPSHOT).write_bytes(b'{"checkpoints": [{"path": "gone')
    third = _Launch(_command(storage, cache, *longer), _env(tmp_path), tmp_path / "l3.log")
    third.wait_for_checkpoint(run_dir, stop_step + 5)
    assert f"resumed from {run_dir / CHECKPOINTS_DIR / f'step_{stop_step:09d}'} at step {stop_step}" in third.text()
    os.kill(third.proc.pid, signal.SIGKILL)
    assert third.finish(timeout=30)[0] == -signal.SIGKILL
    _wait_for_workers_to_end(third.proc.pid)
    steps = _train_steps(run_dir)
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"

    # 4. The same command resumes from the newest checkpoint; SIGTERM (ray job stop, a scheduler) ends
    # it after checkpointing the current step: exit 143, no abort dump.
    newest = _steps(run_dir)[-1]
    fourth = _Launch(_command(storage, cache, *longer), _env(tmp_path), tmp_path / "l4.log")
    fourth.wait_for_checkpoint(run_dir, newest + 3)
    os.kill(fourth.proc.pid, signal.SIGTERM)
    rc, out = fourth.finish(timeout=120)
    assert rc == 143, out[-3000:]
    assert f"at step {newest} " in out and "resumed from" in out, out[-3000:]
    assert "Aborted" not in out and "core dumped" not in out and "Fatal Python error" not in out, out[-3000:]
    assert _fr_lines(out)[-1].startswith("[fr_train] run long stopped on SIGTERM: the same command resumes from")
    assert f"step {_steps(run_dir)[-1]})" in _fr_lines(out)[-1]

    # 5. --overwrite starts over on this directory (Ray's garbage snapshot again included).
    (run_dir / RAY_SNAPSHOT).write_bytes(b"\x00garbage")
    rc, out = _Launch(_command(storage, cache, "--max-steps", "2", "--resume", "never", "--overwrite"),
                      _env(tmp_path), tmp_path / "l5.log").finish()
    assert rc == 0, out[-3000:]
    assert _fr_lines(out)[-4:] == [
        "[fr_train] finished 2 steps", f"[fr_train] model {run_dir / 'final'}",
        f"[fr_train] log {run_dir / 'train_log.jsonl'}",
        f"[fr_train] curves {run_dir / 'tensorboard'}: tensorboard --logdir {storage}"], out[-3000:]
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["event"] for r in records].count("start") == 1 and "resumed from" not in out
