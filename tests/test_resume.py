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
