"""A run stopped at step k and resumed from its checkpoint continues exactly as if it had never
stopped: the same per-step losses, bitwise on CPU, across an epoch boundary, with VPL on, with
the real DALI pipeline and DeepSpeed, at world size 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_train_e2e import SYNTH


def _losses(rank: int, world: int, cfg_dict: dict, stop_after: int) -> list[tuple[int, float]]:
    from fr_train.config import TrainConfig
    from fr_train.worker import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg_dict), rank, world, torch.device("cpu"))
    if stop_after:  # a preemption notice arriving on rank 1 only, during step `stop_after`
        observe = trainer._observe

        def observe_then_maybe_stop(loss: float, times: object) -> None:
            observe(loss, times)
            if trainer.state.step == stop_after and rank == world - 1:
                trainer.stop_requested = True

        trainer._observe = observe_then_maybe_stop
    trainer.fit()
    return [(h["step"], h["loss"]) for h in trainer.state.history]


@pytest.mark.slow
def test_stopped_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path_factory: pytest.TempPathFactory,
                                                                     tmp_path: Path) -> None:
    from cluster.launch import prepare_data
    from fr_train.config import build_config

    cfg = build_config("mbf", "vpl", overrides=[
        f"data.cache_dir={tmp_path_factory.mktemp('resume_cache')}", *SYNTH, f"run.storage={tmp_path}",
        "data.batch_size=32", "schedule.max_steps=20", "run.log_every=1", "eval.enabled=false",
        "head.s=16", "head.vpl_start_iter=4", "head.vpl_delta_t=8", "optimizer.lr=0.05",
        "checkpoint.every_steps=4", "checkpoint.every_minutes=0"])
    cfg.data.path = str(prepare_data(cfg))  # 1024 images: 16 steps per epoch at 2 × 32

    cfg.run.name, cfg.checkpoint.resume = "straight", "never"
    straight = run_distributed(_losses, 2, cfg.to_dict(), 0, timeout=900)[0]
    cfg.run.name, cfg.checkpoint.resume = "interrupted", "auto"
    first = run_distributed(_losses, 2, cfg.to_dict(), 10, timeout=900)[0]
    second = run_distributed(_losses, 2, cfg.to_dict(), 0, timeout=900)[0]

    assert [s for s, _ in straight] == list(range(1, 21))
    assert [s for s, _ in first] == list(range(1, 11))  # stopped after step 10, checkpoint at 10
    assert [s for s, _ in second] == list(range(11, 21))  # resumed at 11, crossed the epoch at 16
    assert first + second == straight  # bitwise: float equality of every step's loss
    checkpoints = sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").glob("step_*"))
    assert checkpoints[-1] == "step_000000020"


@pytest.mark.slow
def test_ray_restarts_a_killed_worker_and_the_run_resumes(tmp_path_factory: pytest.TempPathFactory,
                                                         tmp_path: Path) -> None:
    """SIGKILL one Ray Train worker mid-run: Ray restarts the worker group (FailureConfig), the
    workers resume from the newest checkpoint without a human, and the job finishes; at most one
    checkpoint interval of steps is recomputed."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    import psutil

    from tests.test_train_e2e import SYNTH_FLAGS, _env

    storage, interval, kill_after = tmp_path / "runs", 5, 12
    log = storage / "killed" / "train_log.jsonl"
    killed: list[int] = []

    def kill_a_worker_after_step(job: subprocess.Popen) -> None:
        """Only this job's workers: descendants of the fr_train process (its local Ray cluster)."""
        deadline = time.time() + 600
        while time.time() < deadline and not killed and job.poll() is None:
            steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines()] if log.exists() else []
            if steps and max(steps) >= kill_after:
                for child in psutil.Process(job.pid).children(recursive=True):
                    try:
                        if "RayTrainWorker" in " ".join(child.cmdline()):
                            os.kill(child.pid, signal.SIGKILL)
                            killed.append(child.pid)
                            break
                    except psutil.Error:
                        continue
            time.sleep(0.5)

    cmd = [str(Path(sys.executable).parent / "fr_train"), "mbf", "cosface", "--name", "killed",
           "--storage", str(storage), "--num-workers", "2", "--max-steps", "24",
           "--set", f"data.cache_dir={tmp_path_factory.mktemp('kill_cache')}", *SYNTH_FLAGS,
           "--set", "data.batch_size=16", "--set", "run.log_every=1", "--set", "eval.enabled=false",
           "--set", f"checkpoint.every_steps={interval}", "--set", "run.max_failures=2"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Thread(target=kill_a_worker_after_step, args=(proc,), daemon=True)
    killer.start()
    out, _ = proc.communicate(timeout=900)
    killer.join(timeout=5)
    assert killed, "no RayTrainWorker process was found to kill"
    assert proc.returncode == 0, out[-5000:]
    assert "[fr_train] resumed from" in out, out[-5000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("event") == "train"]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_at = steps[restart] - 1
    assert kill_after - interval <= resumed_at < steps[restart - 1] + 1  # lost at most one interval
    assert steps[restart:] == list(range(resumed_at + 1, 25))  # then every step once, to the end
    assert any(r.get("event") == "end" and r["step"] == 24 for r in records)


def _resumed_losses(rank: int, world: int, cfg_dict: dict, images: torch.Tensor, labels: torch.Tensor,
                    name: str, resume: str, global_batch: int) -> list[tuple[int, float]]:
    """Steps of a run on `world` ranks fed identical global batches (any world size), optionally
    resumed from `resume`; BatchNorm on running statistics (see tests/test_train_e2e.py)."""
    from fr_train.config import TrainConfig
    from fr_train.worker import Trainer
    from tests.test_train_e2e import _SameGlobalBatches

    cfg = TrainConfig.from_dict(cfg_dict)
    cfg.run.name, cfg.checkpoint.resume = name, resume
    cfg.data.batch_size = global_batch // world
    data = _SameGlobalBatches(images, labels, cfg.schedule.max_steps, global_batch, rank, world)
    trainer = Trainer(cfg, rank, world, torch.device("cpu"), data=data)
    trainer.engine.module.eval()
    trainer.engine.train = lambda mode=True: None
    trainer.fit()
    return [(h["step"], h["loss"]) for h in trainer.state.history]


@pytest.mark.slow
def test_a_run_resumes_on_another_world_size_on_the_same_loss_curve(tmp_path_factory: pytest.TempPathFactory,
                                                                   tmp_path: Path) -> None:
    """1 → 2 and 2 → 1 ranks: the head, its optimizer rows and the backbone state are re-split or
    consolidated, the data position is kept in global samples, and the loss sequence continues
    the uninterrupted single-process one to float tolerance (sample_rate 1, same global batches)."""
    import numpy as np

    from tests.test_train_e2e import _equivalence_config, _real_images

    cfg, data_dir = _equivalence_config(tmp_path_factory.mktemp("reshard_cache"), tmp_path)
    cfg["optimizer"]["lr"] = 0.002
    cfg["schedule"]["max_steps"] = 6
    cfg["checkpoint"].update(every_steps=1, every_minutes=0, keep=10)
    images, labels = _real_images(data_dir, 64)
    ckpts = tmp_path / "{}" / "checkpoints" / "step_{:09d}"

    straight = run_distributed(_resumed_losses, 1, cfg, images, labels, "one", "never", 32, timeout=600)[0]
    up = run_distributed(_resumed_losses, 2, cfg, images, labels, "up", str(ckpts).format("one", 2), 32,
                         timeout=600)
    down = run_distributed(_resumed_losses, 1, cfg, images, labels, "down", str(ckpts).format("up", 4), 32,
                           timeout=600)[0]

    assert [s for s, _ in straight] == [1, 2, 3, 4, 5, 6]
    assert up[0] == up[1] and [s for s, _ in up[0]] == [3, 4, 5, 6]  # 1 → 2 from step 2
    assert [s for s, _ in down] == [5, 6]  # 2 → 1 from the 2-rank run's step 4
    reference = dict(straight)
    print(f"\nstraight {straight}\n1->2 {up[0]}\n2->1 {down}")
    for resumed in (up[0], down):
        np.testing.assert_allclose([loss for _, loss in resumed], [reference[s] for s, _ in resumed], rtol=1e-4)
    assert len({loss for _, loss in straight}) == 6  # every step moved the model
