"""Elastic runs: between run.min_workers and run.num_workers workers, the same global batch at every
size, the same images in every step, resumed from the newest checkpoint after each resize; on a real
local Ray cluster whose nodes leave and come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.test_train_e2e import SYNTH


def _cfg(*overrides: str) -> Any:
    from fr_train.config import build_config

    return build_config("mbf", "arcface", overrides=list(overrides))


@pytest.mark.parametrize(("global_batch", "world", "max_micro", "plan"), [
    (24, 3, 8, (8, 1)),  # the full size: the configured micro-batch, no accumulation
    (24, 2, 8, (6, 2)),  # 12 per worker do not fit 8: two micro-batches of 6
    (24, 1, 8, (8, 3)),
    (36, 2, 8, (6, 3)),  # 18 per worker: 9 > 8, so three of 6
    (7, 1, 4, (1, 7)),  # a prime: only single images fit
])
def test_the_global_batch_is_cut_into_the_fewest_micro_batches_that_fit(
        global_batch: int, world: int, max_micro: int, plan: tuple[int, int]) -> None:
    from fr_train.train.batch_plan import split_global_batch

    p = split_global_batch(global_batch, world, max_micro)
    assert (p.micro_batch, p.grad_accum) == plan
    assert p.global_batch == global_batch


def test_a_fixed_size_run_keeps_its_configured_batch_at_any_world_size() -> None:
    from fr_train.train.batch_plan import plan_batches

    cfg = _cfg("data.batch_size=16", "run.grad_accum=2", "run.num_workers=4")
    assert [(p.micro_batch, p.grad_accum, p.global_batch) for p in (plan_batches(cfg, w) for w in (1, 2, 4))] == \
        [(16, 2, 32), (16, 2, 64), (16, 2, 128)]
    # elastic: the global batch of the full size, 12 × 4 × 2 = 96, at every size
    elastic = _cfg("data.batch_size=12", "run.grad_accum=2", "run.num_workers=4", "run.min_workers=2",
                   "data.sampler=global")
    assert [(p.micro_batch, p.grad_accum, p.global_batch) for p in (plan_batches(elastic, w) for w in (4, 3, 2))] == \
        [(12, 2, 96), (8, 4, 96), (12, 4, 96)]
    with pytest.raises(ValueError, match="elastic run of 2 to 4 workers was started on 1"):
        plan_batches(elastic, 1)


@pytest.mark.parametrize(("overrides", "message"), [
    (["run.min_workers=2"], "needs an explicit run.num_workers"),
    (["run.num_workers=2", "run.min_workers=3", "data.sampler=global"], "must be <= run.num_workers"),
    (["run.num_workers=3", "run.min_workers=1"], "data.sampler: must be global or pk"),
    (["run.num_workers=4", "run.min_workers=3", "data.sampler=global", "data.batch_size=16"],
     "does not split evenly over 3 worker(s); it must be a multiple of 12 (e.g. 60 or 72)"),
    (["run.min_workers=-1"], "run.min_workers: must be >= 0"),
])
def test_an_elastic_range_that_cannot_keep_its_global_batch_is_refused(overrides: list[str], message: str) -> None:
    from fr_train.config import ConfigError

    with pytest.raises(ConfigError, match=r"^(run\.min_workers|data\.sampler):") as err:
        _cfg(*overrides)
    assert message in str(err.value)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nvidia.dali")
    from data_pipeline.dali import prepare_dali_index
    from data_pipeline.pack import write_insightface_dataset
    from tests.test_dali import NUM_CLASSES, SIZE, samples

    out = write_insightface_dataset(tmp_path_factory.mktemp("elastic"), samples(seed=4), NUM_CLASSES, (SIZE, SIZE))
    prepare_dali_index(out)
    return out


def _steps(dataset_dir: Path, world: int, micro: int, global_batch: int, steps: int, sampler: str,
           state: dict | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Per optimizer step: the images and labels of all ranks and micro-batches, sorted by record key
    (the order inside a step is the split's business; the set of images is the schedule's)."""
    from data_pipeline.dali import DaliConfig
    from data_pipeline.pk_sampler import PKFaceIterator
    from data_pipeline.scheduled import ScheduledFaceIterator

    cfg = DaliConfig(batch_size=global_batch // world // micro, last_batch="drop", num_threads=1, seed=7)
    if sampler == "pk":
        its = [PKFaceIterator(dataset_dir, cfg, k=4, rank=r, world_size=world, micro_batches=micro)
               for r in range(world)]
    else:
        its = [ScheduledFaceIterator(dataset_dir, cfg, rank=r, world_size=world, micro_batches=micro)
               for r in range(world)]
    if state is not None:
        for it in its:
            it.load_state_dict(state)
    def next_batch(it: Any) -> Any:
        try:
            return next(it)
        except StopIteration:  # the epoch ended: the Trainer resets and goes on
            it.reset()
            return next(it)

    images, labels = [], []
    for _ in range(steps):
        batches = [next_batch(it) for it in its for _ in range(micro)]
        keys = torch.cat([b.keys for b in batches])
        order = torch.argsort(keys)
        assert len(set(keys.tolist())) == len(keys)  # no image twice in a step
        images.append(torch.cat([b.images for b in batches])[order])
        labels.append(torch.cat([b.labels for b in batches])[order])
    return images, labels, its[0].state_dict()


@pytest.mark.parametrize("sampler", ["global", "pk"])
def test_every_split_of_the_global_batch_reads_the_same_images_in_each_step(dataset_dir: Path, sampler: str) -> None:
    """One optimizer step holds the same 24 images (flips included) whether 3 workers read 8 each,
    2 workers two micro-batches of 6, or 1 worker three of 8; a position saved at one split resumes
    at another; steps cross the epoch boundary."""
    full_images, full_labels, state = _steps(dataset_dir, 3, 1, 24, 6, sampler)
    assert state["epoch"] >= 1  # the six steps crossed an epoch boundary (101 images: 4 global steps of 24)
    for world, micro in ((2, 2), (1, 3)):
        images, labels, _ = _steps(dataset_dir, world, micro, 24, 6, sampler)
        for step in range(6):
            assert torch.equal(labels[step], full_labels[step]) and torch.equal(images[step], full_images[step])
    _, _, state = _steps(dataset_dir, 3, 1, 24, 2, sampler)  # stopped after 2 steps at W=3 ...
    images, labels, _ = _steps(dataset_dir, 1, 3, 24, 4, sampler, state)  # ... resumed at W=1
    for step in range(4):
        assert torch.equal(images[step], full_images[2 + step]) and torch.equal(labels[step], full_labels[2 + step])


def _dali(batch: int) -> Any:
    from data_pipeline.dali import DaliConfig

    return DaliConfig(batch_size=batch, last_batch="drop", num_threads=1, seed=7)


def test_a_position_from_another_global_batch_is_refused(dataset_dir: Path) -> None:
    from data_pipeline.scheduled import ScheduledFaceIterator

    _, _, state = _steps(dataset_dir, 2, 1, 24, 1, "global")
    other = ScheduledFaceIterator(dataset_dir, _dali(8), rank=0, world_size=2)
    with pytest.raises(ValueError, match="global_batch: saved 24 vs now 16"):
        other.load_state_dict(state)


def _elastic_config(cache: Path, storage: Path, name: str, steps: int) -> Any:
    """mbf CosFace at 64x64, elastic 1 to 3 workers with a global batch of 24, the settings under
    which a step is the same computation at every split: all prototypes (sample_rate 1) and
    BatchNorm on running statistics (module docstring of fr_train/train/batch_plan.py)."""
    from cluster.launch import prepare_data

    cfg = _cfg(f"data.cache_dir={cache}", *SYNTH, f"run.storage={storage}", f"run.name={name}",
               "method=cosface", "head.margin=cosface", "head.m2=0", "head.m3=0.35",
               "data.batch_size=8", "run.num_workers=3", "run.min_workers=1", "data.sampler=global",
               "backbone.freeze_bn=true", "head.sample_rate=1", "head.s=16", "optimizer.lr=0.002",
               "optimizer.base_batch=24", "optimizer.clip_grad_norm=0", f"schedule.max_steps={steps}",
               "run.log_every=1", "eval.enabled=false", "checkpoint.every_steps=0", "checkpoint.every_minutes=0")
    cfg.data.path = str(prepare_data(cfg))
    return cfg


def _fit(rank: int, world: int, cfg_dict: dict, stop_after: int) -> list[tuple[int, float, int, int]]:
    from tests.test_resume import fit_stopping_after

    trainer = fit_stopping_after(rank, world, cfg_dict, stop_after)
    return [(h["step"], h["loss"], trainer.plan.micro_batch, trainer.plan.grad_accum) for h in trainer.state.history]


@pytest.mark.slow
def test_a_run_shrinking_from_three_workers_to_one_follows_the_uninterrupted_loss_curve(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Steps 1-3 at W=3 (8 images each), 4-6 at W=2 (two micro-batches of 6), 7-9 at W=1 (three of 8),
    each start resuming the previous one's checkpoint: the losses are those of one uninterrupted W=1
    run to float tolerance (the steps differ only in summation order)."""
    cache = tmp_path_factory.mktemp("elastic_cache")
    straight_cfg = _elastic_config(cache, tmp_path, "straight", 9)
    straight = run_distributed(_fit, 1, straight_cfg.to_dict(), 0, timeout=600)[0]
    cfg = _elastic_config(cache, tmp_path, "elastic", 9)
    parts = []
    for world, stop in ((3, 3), (2, 6), (1, 0)):
        out = run_distributed(_fit, world, cfg.to_dict(), stop, timeout=600)
        assert all(o == out[0] for o in out)  # the same losses on every rank
        parts += out[0]
    assert [(s, m, a) for s, _, m, a in parts] == [(1, 8, 1), (2, 8, 1), (3, 8, 1), (4, 6, 2), (5, 6, 2), (6, 6, 2),
                                                  (7, 8, 3), (8, 8, 3), (9, 8, 3)]
    assert [s for s, *_ in straight] == list(range(1, 10))
    losses, reference = np.array([loss for _, loss, *_ in parts]), np.array([loss for _, loss, *_ in straight])
    print(f"\nelastic  {np.round(losses, 5).tolist()}\nstraight {np.round(reference, 5).tolist()}")
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    assert len(set(reference.tolist())) == len(reference)  # every step changed the model
