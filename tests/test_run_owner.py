"""One launch at a time per run directory (issue 26): a second launch of a live run is refused with
one line naming the owner; a launch that is gone (crashed, SIGKILLed, its heartbeat stale) never
leaves its run stuck; only the owner removes its record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from cluster.run_owner import (
    OWNER_NAME,
    STALE_AFTER_S,
    RunInUseError,
    claim_run,
    read_owner,
    this_process,
)
from tests.test_gpu_configuration_on_cpu import TINY
from tests.test_train_e2e import _env

BIN = Path(sys.executable).parent


def _write_owner(run_dir: Path, **fields: object) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OWNER_NAME).write_text(json.dumps({**asdict(this_process()), **fields}))


def _live_other_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_live_owner_on_this_machine_refuses_a_second_claim_naming_pid_host_and_since(tmp_path: Path) -> None:
    run = tmp_path / "run"
    other = _live_other_process()
    try:
        import psutil

        _write_owner(run, pid=other.pid, pid_started=psutil.Process(other.pid).create_time())
        with pytest.raises(RunInUseError) as err:
            claim_run(run)
        message = str(err.value)
        assert f"pid {other.pid} on {this_process().host} since " in message
        assert "another --name" in message and f"kill -TERM {other.pid}" in message
        assert read_owner(run)[0].pid == other.pid  # the live owner's record is untouched
    finally:
        other.kill()
        other.wait()


def test_a_record_left_by_a_killed_launch_is_taken_over_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    gone = _live_other_process()
    gone.kill()
    gone.wait()
    _write_owner(run, pid=gone.pid, pid_started=123.0)
    with claim_run(run) as ownership:
        assert ownership.took_over is not None and ownership.took_over.pid == gone.pid
        assert read_owner(run)[0] == ownership.owner == this_process() or read_owner(run)[0].pid == os.getpid()
    assert not (run / OWNER_NAME).exists()
    assert [p.name for p in run.iterdir()] == []  # nothing set aside is left behind


def test_a_reused_pid_is_not_taken_for_the_owner(tmp_path: Path) -> None:
    """The recorded pid is alive but started at another time: another process now has that pid."""
    run = tmp_path / "run"
    _write_owner(run, pid=os.getpid(), pid_started=this_process().pid_started - 3600)
    with claim_run(run) as ownership:
        assert ownership.took_over is not None


def test_an_owner_on_another_machine_counts_as_gone_only_when_its_heartbeat_is_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_owner(run, host="gpu-node-7", boot_id="elsewhere", pid=4242)
    with pytest.raises(RunInUseError, match="pid 4242 on gpu-node-7"):
        claim_run(run)
    old = time.time() - STALE_AFTER_S - 5
    os.utime(run / OWNER_NAME, (old, old))
    with claim_run(run) as ownership:
        assert ownership.took_over is not None and ownership.took_over.host == "gpu-node-7"


def test_an_unreadable_record_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / OWNER_NAME).write_text('{"host": "half-writ')
    with claim_run(run) as ownership:
        assert ownership.took_over is not None


def test_release_never_removes_another_launchs_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ownership = claim_run(run)
    other = replace(this_process(), pid=1, since="2026-12-04T00:00:00Z")
    (run / OWNER_NAME).write_text(json.dumps(asdict(other)))  # taken over while this one hung
    ownership.release()
    assert read_owner(run)[0].pid == 1


def test_the_heartbeat_keeps_the_record_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.run_owner as run_owner

    monkeypatch.setattr(run_owner, "HEARTBEAT_S", 0.05)
    run = tmp_path / "run"
    with claim_run(run):
        old = time.time() - 1000
        os.utime(run / OWNER_NAME, (old, old))
        time.sleep(0.3)
        assert read_owner(run)[1] < 5


@pytest.mark.slow
def test_a_second_launch_of_a_running_run_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    """Two launches of one --name a few seconds apart (2026-12-03: both ran to the end, the second
    set the first's checkpoint aside, both wrote final/)."""
    def cmd(steps: int) -> list[str]:
        return [str(BIN / "fr_train"), "mbf", "arcface", "--storage", str(tmp_path / "runs"), "--name", "twice",
                "--num-workers", "1", "--max-steps", str(steps), "--set", f"data.cache_dir={tmp_path / 'cache'}",
                *[a for s in TINY for a in ("--set", s)], "--set", "data.batch_size=8", "--set", "eval.enabled=false",
                "--set", "run.export_onnx=false", "--set", "checkpoint.every_steps=2"]

    env = _env(tmp_path)
    first = subprocess.Popen(cmd(16), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             stdin=subprocess.DEVNULL)
    owner_file = tmp_path / "runs" / "twice" / OWNER_NAME
    deadline = time.monotonic() + 120
    while not owner_file.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert owner_file.exists()
    second = subprocess.run(cmd(16), env=_env(tmp_path), capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    out, _ = first.communicate(timeout=400)
    assert first.returncode == 0, out[-3000:]
    lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
    assert second.returncode == 1, lines
    assert lines[-1].startswith("fr_train: error: ") and f"in use by another launch: pid {first.pid} on " in lines[-1]
    assert not (tmp_path / "runs" / "twice" / "set_aside").exists()  # the second moved nothing
    assert not owner_file.exists()  # the first released it at the end
    steps = [json.loads(x)["step"] for x in (tmp_path / "runs" / "twice" / "train_log.jsonl").read_text().splitlines()
             if json.loads(x).get("event") == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one writer
