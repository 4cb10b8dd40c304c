"""Every method preset runs through the real training loop (DeepSpeed backbone, sharded head or
global-batch loss, gloo, two ranks): finite losses, identical on both ranks, going down."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fr_train.config import METHODS
from tests.distributed import run_distributed
from tests.test_train_e2e import _equivalence_config, _real_images, _SameGlobalBatches


def _losses_per_method(rank: int, world: int, cfg_dict: dict, images: torch.Tensor, labels: torch.Tensor,
                       methods: list[str], steps: int, teacher: str) -> dict[str, list[float]]:
    from fr_train.config import METHODS as presets
    from fr_train.config import TrainConfig, set_value
    from fr_train.train.trainer import Trainer

    out = {}
    for method in methods:
        cfg = TrainConfig.from_dict(cfg_dict)
        cfg.method, cfg.run.name = method, f"methods-{method}"
        for key, value in presets[method][1].items():
            set_value(cfg, key, value)
        cfg.head.s = min(cfg.head.s, 16.0)  # a gentler scale for a 4-step run on 16 identities
        cfg.head.uss_start_epoch = cfg.head.epl_start_epoch = 0
        cfg.data.batch_size = 16 // world
        cfg.schedule.max_steps = steps
        if method == "distill":
            cfg.distill.teacher = teacher
        data = _SameGlobalBatches(images, labels, steps, 16, rank, world)
        trainer = Trainer(cfg, rank, world, torch.device("cpu"), data=data)
        trainer.fit()
        out[method] = [h["loss"] for h in trainer.state.history]
    return out


def _saved_model(directory: Path, image_size: int) -> Path:
    """A model in the layout a finished run leaves in RUN/final (backbone.safetensors + model.json)."""
    import json

    from fr_train.backbones import build_backbone
    from fr_train.export import save_backbone

    torch.manual_seed(7)
    save_backbone(build_backbone("r18", embedding_size=256, image_size=image_size), directory / "backbone.safetensors")
    (directory / "model.json").write_text(json.dumps({"backbone": "r18", "embedding_size": 256,
                                                      "image_size": image_size}))
    return directory


@pytest.mark.slow
def test_every_method_preset_trains_on_two_ranks(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    cfg, data_dir = _equivalence_config(tmp_path_factory.mktemp("methods_cache"), tmp_path)
    cfg["optimizer"]["lr"] = 0.05
    cfg["run"]["export_onnx"] = False  # 13 ONNX exports would take most of the test's time (tests/test_export.py)
    images, labels = _real_images(data_dir, 32)
    labels = labels % 8  # 8 identities × 4 images: every batch has positive pairs for the pair losses
    steps = 6
    teacher = _saved_model(tmp_path / "teacher", image_size=images.shape[-1])
    results = run_distributed(_losses_per_method, 2, cfg, images, labels, list(METHODS), steps, str(teacher),
                              timeout=900)
    assert results[0] == results[1]  # the loss is the same number on every rank
    for method, losses in results[0].items():
        assert len(losses) == steps and np.all(np.isfinite(losses)), (method, losses)
        # Six steps are too few for the noisy pair losses (and USS joins the loss after step 1), but
        # every prototype method must already be going down.
        if METHODS[method][1].get("head.loss", "margin_softmax") in ("margin_softmax", "bce", "unpg", "epl"):
            assert np.mean(losses[-2:]) < np.mean(losses[:2]), (method, losses)
