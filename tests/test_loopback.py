"""A local run listens on loopback only: every listening socket of a plain `fr_train`'s processes
(the driver, the Ray cluster it starts, the Ray Train workers) is on 127.0.0.1, ::1 or
::ffff:127.0.0.1, sampled while the run trains. Before cluster/local_cluster.py (2026-12-03):
11 listeners on 0.0.0.0, :: and the LAN address (Ray's gRPC servers, torch's TCPStore). The same run's
console holds fr_train's lines only (before, 2026-12-03: Ray's token notice, Ray Train's
PreemptionWatcher error line and resource-request warning, DeepSpeed's op-build line per rank)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.console_lines import foreign_lines
from tests.test_gpu_configuration_on_cpu import TINY
from tests.test_train_e2e import _env

BIN = Path(sys.executable).parent


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def listeners(root_pid: int) -> dict[tuple[str, int], str]:
    """Every listening TCP socket of the process and its descendants: (address, port) -> the
    owning process, named by pid and command line."""
    found: dict[tuple[str, int], str] = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
            name = f"pid {proc.pid} ({' '.join(proc.cmdline())[:120]})"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found[(c.laddr.ip, c.laddr.port)] = name
    return found


def not_on_loopback(found: dict[tuple[str, int], str]) -> list[str]:
    return [f"{ip}:{port} by {who}" for (ip, port), who in sorted(found.items()) if not _loopback(ip)]


def test_the_check_names_a_listener_on_every_interface() -> None:
    """The sampler itself: a child listening on 0.0.0.0 is found and named; one on 127.0.0.1 passes."""
    code = ("import socket,sys,time; a=socket.socket(); a.bind(('0.0.0.0',0)); a.listen(); "
            "b=socket.socket(); b.bind(('127.0.0.1',0)); b.listen(); print(a.getsockname()[1], flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        bad = not_on_loopback(listeners(child.pid))
        assert len(bad) == 1 and bad[0].startswith(f"0.0.0.0:{port} by pid {child.pid}"), bad
        assert len(listeners(child.pid)) == 2
    finally:
        child.kill()
        child.wait()


def _bystander_ray(tmp_path: Path) -> subprocess.Popen:
    """Another Ray instance on this machine (a second local run, a user's own cluster): with one,
    Ray's process scan for "the" local cluster raised `Found multiple active Ray instances` every few
    seconds into a run's console (Ray Train's placement-group cleaner). `--block`: ending this
    process ends that cluster and nothing else (`ray stop` would stop every Ray on the machine)."""
    import tempfile

    from tests.distributed import free_port

    temp = tempfile.mkdtemp(prefix="rayb", dir="/tmp")  # short: Ray's socket paths are length-limited
    return subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()),
                             "--node-ip-address", "127.0.0.1", "--num-cpus", "0", "--include-dashboard", "false",
                             "--temp-dir", temp, "--disable-usage-stats"], env=_env(tmp_path),
                            stdout=(tmp_path / "bystander.txt").open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_every_socket_of_a_local_run_listens_on_loopback(tmp_path: Path) -> None:
    """Two workers (so the process group has peers to meet), sampled every 0.3 s until the run ends,
    beside another Ray instance on the machine."""
    bystander = _bystander_ray(tmp_path)
    try:
        _run_and_sample(tmp_path)
    finally:
        bystander.terminate()
        bystander.wait(timeout=60)


def _run_and_sample(tmp_path: Path) -> None:
    cmd = [str(BIN / "fr_train"), "mbf", "arcface", "--storage", str(tmp_path / "runs"), "--name", "loopback",
           "--num-workers", "2", "--max-steps", "8", "--set", f"data.cache_dir={tmp_path / 'cache'}",
           *[a for s in TINY for a in ("--set", s)], "--set", "data.batch_size=8", "--set", "eval.enabled=false",
           "--set", "run.export_onnx=false", "--set", "run.log_every=1"]
    log = tmp_path / "console.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seen: dict[tuple[str, int], str] = {}
        samples_while_training = 0
        train_log = tmp_path / "runs" / "loopback" / "train_log.jsonl"
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            now = listeners(proc.pid)
            seen.update(now)
            if train_log.is_file() and train_log.stat().st_size and any("RayTrainWorker" in w for w in now.values()):
                samples_while_training += 1
            time.sleep(0.3)
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    console = log.read_text()
    assert rc == 0, console[-3000:]
    assert samples_while_training >= 3, (samples_while_training, console[-2000:])
    # What was seen: Ray's servers (GCS, raylet, dashboard, agents) and each worker's own.
    assert len(seen) >= 5, seen
    assert sum("RayTrainWorker" in w for w in seen.values()) >= 2, seen
    assert not_on_loopback(seen) == [], "\n".join(not_on_loopback(seen))
    assert "Found multiple active Ray instances" not in console
    # The same run's console is fr_train's lines only (issue 25): no line of Ray's or DeepSpeed's.
    assert foreign_lines(console) == [], "\n".join(foreign_lines(console))
