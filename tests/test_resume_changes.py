"""What may change when a run is resumed (issue 26): settings that only change how the next steps
are batched continue the run; settings that change the saved tensors' shape or meaning are refused
on the driver, before Ray starts, naming the field.

- ``data.batch_size`` / ``run.grad_accum``: continued. The reader's position is counted in batches
  and means nothing at another batch size, but the epoch's sample count does: the reader restarts
  the epoch past the samples already seen (as across a world-size change) and the RNG streams are
  reseeded; the learning rate follows the new global batch (``optimizer.base_batch``).
- backbone, embedding size, margin (the method), VPL, optimizer, the dataset's class count:
  refused (``fr_train.checkpointing.resume.COMPAT_FIELDS``): the weights, the prototype matrix or
  the optimizer state would not fit or would mean something else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.launch import check_resume_compatible, prepare_data
from fr_train.checkpointing import check_run_directory
from fr_train.config import TrainConfig, build_config
from tests.test_gpu_configuration_on_cpu import TINY


def _cfg(storage: Path, cache: Path, *extra: str, method: str = "arcface") -> TrainConfig:
    cfg = build_config("mbf", method, overrides=[
        f"run.storage={storage}", "run.name=r", f"data.cache_dir={cache}", *TINY, "data.batch_size=8",
        "eval.enabled=false", "run.export_onnx=false", "checkpoint.every_steps=2", "checkpoint.every_minutes=0",
        "run.log_every=1", *extra])
    cfg.data.path = str(prepare_data(cfg))
    return cfg


def _classes(cfg: TrainConfig) -> int:
    from data_pipeline.dataset import open_dataset

    with open_dataset(cfg.data.path) as dataset:
        return dataset.num_classes


def _two_starts(rank: int, world: int, first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    from fr_train.train.trainer import Trainer

    a = Trainer(TrainConfig.from_dict(first), rank, world, torch.device("cpu"))
    a.fit()
    b = Trainer(TrainConfig.from_dict(second), rank, world, torch.device("cpu"))
    b.fit()
    return {"resumed_from": str(b.resumed_from), "steps": [h["step"] for h in b.state.history],
            "global_batch": b.global_batch, "samples_seen": b.state.samples_seen}


def test_a_new_batch_size_continues_the_run_and_a_new_model_is_refused_on_the_driver(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.distributed import run_distributed

    cache = tmp_path_factory.mktemp("changes_cache")
    first = _cfg(tmp_path, cache, "schedule.max_steps=4")
    second = _cfg(tmp_path, cache, "schedule.max_steps=6", "data.batch_size=16")
    out = run_distributed(_two_starts, 1, first.to_dict(), second.to_dict(), timeout=600)[0]
    assert out["resumed_from"].endswith("step_000000004")
    assert out["steps"] == [5, 6] and out["global_batch"] == 16
    assert out["samples_seen"] == 4 * 8 + 2 * 16  # no sample counted twice, none lost

    for changed, field in [(("backbone.embedding_size=128",), "backbone.embedding_size"),
                           (("schedule.max_steps=8",), None)]:
        cfg = _cfg(tmp_path, cache, *changed)
        start = check_run_directory(tmp_path / "r", cfg, hash_files=False)
        if field is None:
            check_resume_compatible(start, cfg, _classes(cfg))
            continue
        with pytest.raises(ValueError, match=re.escape(f"field '{field}' is 512 in the checkpoint, 128 in this run")):
            check_resume_compatible(start, cfg, _classes(cfg))

    cosface = _cfg(tmp_path, cache, method="cosface")
    with pytest.raises(ValueError, match=r"field 'head\.margin' is"):
        check_resume_compatible(check_run_directory(tmp_path / "r", cosface, hash_files=False), cosface,
                                _classes(cosface))
    other_data = _cfg(tmp_path, cache, "data.synthetic.num_identities=30")
    with pytest.raises(ValueError, match=re.escape("field 'num_classes' is 24, this run's dataset has 30")):
        check_resume_compatible(check_run_directory(tmp_path / "r", other_data, hash_files=False), other_data,
                                _classes(other_data))
