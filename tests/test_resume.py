"""Under Ray a run survives a node preemption and SIGTERM. A run stopped at step k and resumed
continues bitwise (W=2, ZeRO 1, VPL, DALI, across an epoch boundary): tests/test_gpu_configuration_on_cpu.py;
killed at 20 points of the checkpoint's life: tests/test_kill_points.py; on another world size:
tests/test_elastic.py. ``fit_stopping_after`` is their stop request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


def fit_stopping_after(rank: int, world: int, cfg_dict: dict, stop_after: int) -> Any:
    """A fitted Trainer; with ``stop_after``, a stop request (as a preemption notice or a SIGTERM
    would give) arrives on the last rank only, during step ``stop_after``."""
    from fr_train.config import TrainConfig
    from fr_train.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg_dict), rank, world, torch.device("cpu"))
    if stop_after:
        observe = trainer._observe

        def observe_then_maybe_stop(loss: float, times: object) -> None:
            observe(loss, times)
            if trainer.state.step == stop_after and rank == world - 1:
                trainer.stop_requested = True

        trainer._observe = observe_then_maybe_stop
    trainer.fit()
    return trainer


def _losses(rank: int, world: int, cfg_dict: dict, stop_after: int) -> list[tuple[int, float]]:
    trainer = fit_stopping_after(rank, world, cfg_dict, stop_after)
    return [(h["step"], h["loss"]) for h in trainer.state.history]


def _ray_train_workers(temp_dir: Path) -> list[int]:
    """PIDs of the RayTrainWorker processes of the Ray cluster that lives in ``temp_dir``."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" not in " ".join(proc.info["cmdline"] or []):
                continue
            if any(str(temp_dir) in " ".join(a.cmdline()) for a in proc.parents()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.slow
def test_ray_survives_a_node_preemption_and_a_sigterm(tmp_path_factory: pytest.TempPathFactory,
                                                      tmp_path: Path) -> None:
    """Against a real two-node Ray cluster (both raylets on 127.0.0.1):

    1. the node the workers run on is drained as a preemption (what a spot reclaim looks like to
       Ray): the workers checkpoint at the step the notice arrives, Ray interrupts them at the
       deadline and restarts them on the other node, they resume from that step or later, and every
       step recomputed after the resume reproduces the loss it had before, bit for bit;
    2. a worker is sent SIGTERM (a VM shutting down): every rank finishes the step, checkpoints it
       and stops; Ray restarts them and they go on from the next step, recomputing nothing.
    The job ends with every step accounted for: none lost beyond the interval, none counted twice.
    (A worker or node dying without notice: tests/test_elastic.py SIGKILLs nodes under Ray, and
    tests/test_kill_points.py kills a process at 20 points of the checkpoint's life.)"""
    import json
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from tests.distributed import free_port
    from tests.test_train_e2e import SYNTH_FLAGS, _env

    bin_dir = Path(sys.executable).parent
    env = {**_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
    temp_dir = Path(tempfile.mkdtemp(prefix="rayp", dir="/tmp"))  # short: socket paths are length-limited
    port = free_port()
    address = f"127.0.0.1:{port}"

    def ray_cli(*args: str) -> None:
        # Output to a file, not a pipe: daemons that `ray start` leaves behind inherit it, and a pipe
        # would keep the call waiting until they exit.
        with (tmp_path / "ray_cli.log").open("a") as out:
            rc = subprocess.run([str(bin_dir / "ray"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=180).returncode
        assert rc == 0, f"ray {' '.join(args)} failed: " + (tmp_path / "ray_cli.log").read_text()[-3000:]

    # The head runs the driver and Ray Train's controller (never drained, as on a real cluster); the
    # workers run on node A, later drained, then on node B.
    ray_cli("start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "0",
            "--num-gpus", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
            "--temp-dir", str(temp_dir), "--disable-usage-stats")
    ray_cli("start", "--address", address, "--num-cpus", "2", "--num-gpus", "0")
    nodes = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto'); print(next(n['NodeID'] for n "
                            "in ray.nodes() if n['Alive'] and 'node:__internal_head__' not in n['Resources']))"],
                           env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
    node_a = nodes.stdout.strip().splitlines()[-1]
    storage, interval, drain_after, term_after, total = tmp_path / "runs", 5, 14, 30, 40
    log = storage / "faults" / "train_log.jsonl"
    cmd = [str(bin_dir / "fr_train"), "mbf", "cosface", "--name", "faults",
           "--storage", str(storage), "--num-workers", "2", "--max-steps", str(total),
           "--set", f"data.cache_dir={tmp_path_factory.mktemp('kill_cache')}", *SYNTH_FLAGS,
           "--set", "data.batch_size=16", "--set", "run.log_every=1", "--set", "eval.enabled=false",
           "--set", f"checkpoint.every_steps={interval}", "--set", "checkpoint.preemption_poll_steps=1",
           "--set", "run.max_failures=3", "--set", "run.export_onnx=false"]
    driver_log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": address}, stdout=driver_log, stderr=subprocess.STDOUT,
                            text=True)
    drained, terminated = "", []
    try:
        def steps() -> list[int]:
            lines = log.read_text().splitlines() if log.exists() else []
            return [json.loads(line)["step"] for line in lines if '"event": "train"' in line]

        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and not terminated:
            seen = steps()
            if not drained and seen and max(seen) >= drain_after:
                # A second node to move to, then the preemption of the one the workers are on.
                ray_cli("start", "--address", address, "--num-cpus", "2", "--num-gpus", "0")
                drained = node_a
                ray_cli("drain-node", "--address", address, "--node-id", drained,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", "20")
                print(f"[test] node {drained[:12]} drained after step {max(seen)}", flush=True)
            elif drained and seen.count(seen[-1]) == 1 and seen[-1] >= term_after and \
                    log.read_text().count('"event": "start"') == 2:  # running again, after the preemption
                workers = _ray_train_workers(temp_dir)
                assert workers, "no RayTrainWorker process was found to terminate"
                os.kill(workers[-1], signal.SIGTERM)
                terminated.append(workers[-1])
                print(f"[test] SIGTERM to worker {workers[-1]} after step {seen[-1]}", flush=True)
            time.sleep(0.5)
        proc.wait(timeout=900)
    finally:
        driver_log.close()
        if proc.poll() is None:
            proc.kill()
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    out = (tmp_path / "driver.log").read_text()
    assert drained and terminated, out[-5000:]
    assert proc.returncode == 0, out[-5000:]

    records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    restarts = [i for i in range(1, len(train)) if train[i][0] <= train[i - 1][0]]
    assert len(restarts) == 1, train  # one after the preemption; none after SIGTERM:
    # Ray echoes each worker line twice; the two resumes are from two different steps.
    resumed = list(dict.fromkeys(int(m.split("step_")[1].split()[0]) for m in out.split("[fr_train] resumed from ")[1:]))
    assert len(resumed) == 2, out[-5000:]  # the SIGTERM restart resumed at the very step it stopped
    stopped_at = int(out.split("[fr_train] stopped at step ")[1].split()[0])
    assert "SIGTERM at step" in out and resumed[1] == stopped_at, out[-5000:]
    assert [s for s, _ in train].count(stopped_at + 1) == 1  # so its next step ran once, and none was lost
    notice = next(int(line.split("preemption notice at step ")[1].split(":")[0]) for line in out.splitlines()
                  if "preemption notice at step " in line)
    preempted_at = train[restarts[0] - 1][0]
    assert notice <= resumed[0] <= preempted_at  # nothing before the notice was lost
    for i, start in enumerate(restarts):  # then every step once, to the next restart or the end
        stop = restarts[i + 1] if i + 1 < len(restarts) else len(train)
        assert [s for s, _ in train[start:stop]] == list(range(train[start][0], train[start][0] + stop - start))
    assert train[-1][0] == total and any(r.get("event") == "end" and r["step"] == total for r in records)
    # fr_train is the run's one record of checkpoints: Ray Train got metrics only, and kept no list that a
    # later launch would read (and that pruning would make stale: issue 28)
    assert not (storage / "faults" / "checkpoint_manager_snapshot.json").exists()
    assert (storage / "faults" / "checkpoints" / "step_000000040" / "MANIFEST.json").is_file()
    first_time: dict[int, float] = {}
    repeated = 0
    for step, loss in train:  # a recomputed step reproduces its first loss exactly
        if step in first_time:
            assert loss == first_time[step], (step, loss, first_time[step])
            repeated += 1
        first_time.setdefault(step, loss)
    assert repeated >= preempted_at - resumed[0]
