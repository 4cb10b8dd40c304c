"""A build lock left by a killed extension build never makes a later worker wait forever.

DeepSpeed JIT-builds its CPU shared-memory op under TORCH_EXTENSIONS_DIR behind torch's
``FileBaton`` lock file. These tests take that lock with the real ``FileBaton`` in a real process,
and load the real op through DeepSpeed's own ``build_shm_op`` in a fresh interpreter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fr_train.train.build_locks import clear_abandoned_build_locks, local_holders

SHM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.comm.ShareMemCommBuilder.NAME

HOLD_LOCK = """
import sys, time
from torch.utils.file_baton import FileBaton
baton = FileBaton(sys.argv[1])
assert baton.try_acquire(), "the lock already exists"
print("held", flush=True)
time.sleep(600)
"""

LOAD_SHM_OP = """
from deepspeed.comm.torch import build_shm_op
print("loading", flush=True)
op = build_shm_op()
print("loaded", None if op is None else op.__file__, flush=True)
"""


def _hold(lock: Path) -> subprocess.Popen[str]:
    """A process that has taken ``lock`` with torch's FileBaton, as a builder does, and keeps it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


@pytest.fixture
def killed_builders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            _kill(p)


def _load_env(root: Path) -> dict[str, str]:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}


@pytest.fixture(scope="module")
def built_shm_op() -> Path:
    """The DeepSpeed shm op as this environment builds it (once, in its own TORCH_EXTENSIONS_DIR, as
    any CPU training run does); copied into a temporary root below so that a load there is quick."""
    from fr_train.train.build_locks import extensions_root

    out = subprocess.run([sys.executable, "-c", LOAD_SHM_OP], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    if "loaded None" in out.stdout:
        pytest.skip("DeepSpeed builds no shared-memory op on this accelerator")
    built = Path(out.stdout.split("loaded ", 1)[1].strip()).parent
    assert built.name == SHM_OP and built.is_relative_to(extensions_root())
    return built


def test_a_lock_left_by_a_killed_build_is_removed_and_the_op_loads(
        tmp_path: Path, built_shm_op: Path, killed_builders: list[subprocess.Popen[str]]) -> None:
    root = tmp_path / "torch_extensions"
    shutil.copytree(built_shm_op, root / SHM_OP, ignore=shutil.ignore_patterns("lock"))
    lock = root / SHM_OP / "lock"
    builder = _hold(lock)
    killed_builders.append(builder)
    _kill(builder)  # killed mid-build: the lock stays
    assert lock.is_file()

    # Without the cleanup, DeepSpeed's load waits on the lock with no end and no message.
    blocked = subprocess.Popen([sys.executable, "-c", LOAD_SHM_OP], env=_load_env(root), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert blocked.stdout is not None
        assert "loading\n" in iter(blocked.stdout.readline, "")  # DeepSpeed also logs to stdout
        with pytest.raises(subprocess.TimeoutExpired):
            blocked.wait(5)
    finally:
        _kill(blocked)

    assert clear_abandoned_build_locks(root, shared=False) == [lock]
    assert not lock.exists()
    loaded = subprocess.run([sys.executable, "-c", LOAD_SHM_OP], env=_load_env(root), capture_output=True, text=True,
                            timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert f"loaded {root / SHM_OP / SHM_OP}.so" in loaded.stdout
    assert not lock.exists()  # the load took and released the lock itself


def test_a_lock_held_by_a_live_builder_is_left_alone(tmp_path: Path,
                                                     killed_builders: list[subprocess.Popen[str]]) -> None:
    lock = tmp_path / "py311_cpu" / SHM_OP / "lock"  # the depth of torch's default root
    builder = _hold(lock)
    killed_builders.append(builder)
    assert local_holders(lock) == [builder.pid]
    assert clear_abandoned_build_locks(tmp_path, shared=False) == []
    assert clear_abandoned_build_locks(tmp_path, shared=True, shared_grace_s=0) == []  # even when "old"
    assert lock.is_file()
    _kill(builder)
    assert local_holders(lock) == []
    assert clear_abandoned_build_locks(tmp_path, shared=False) == [lock]


def _unheld_lock(root: Path, age_s: float) -> Path:
    lock = root / SHM_OP / "lock"
    lock.parent.mkdir(parents=True)
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_on_shared_storage_an_unheld_lock_is_removed_once_older_than_any_build(tmp_path: Path) -> None:
    """Another node's live builder is invisible here: the lock is given until shared_grace_s, then removed."""
    lock = _unheld_lock(tmp_path, age_s=1.0)
    t0 = time.monotonic()
    assert clear_abandoned_build_locks(tmp_path, shared=True, shared_grace_s=3.0, poll_s=0.1) == [lock]
    assert 1.5 <= time.monotonic() - t0 < 30
    assert not lock.exists()


def test_on_shared_storage_a_lock_released_meanwhile_ends_the_wait(tmp_path: Path) -> None:
    lock = _unheld_lock(tmp_path, age_s=0.0)
    threading.Timer(1.0, lock.unlink).start()  # the other node's build finishes
    t0 = time.monotonic()
    assert clear_abandoned_build_locks(tmp_path, shared=True, shared_grace_s=600, poll_s=0.1) == []
    assert time.monotonic() - t0 < 30


def test_no_extensions_root_means_nothing_to_do(tmp_path: Path) -> None:
    assert clear_abandoned_build_locks(tmp_path / "never_built") == []
