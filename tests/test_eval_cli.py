"""`fr_eval`: a saved backbone scored on .bin sets gives the numbers the training loop computes."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from data_pipeline.binset import write_bin
from fr_train.backbones import build_backbone
from fr_train.evaluation.cli import main
from fr_train.evaluation.runner import evaluate_verification, load_verification_set
from fr_train.export import save_backbone


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_fr_eval_scores_a_saved_model_like_the_trainer(tmp_path, capsys):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_backbone("mbf", image_size=64).eval()
    final = tmp_path / "final"
    final.mkdir()
    save_backbone(model, final / "backbone.safetensors")
    (final / "model.json").write_text(json.dumps({"backbone": "mbf", "embedding_size": 512, "image_size": 64}))
    bin_path = write_bin(tmp_path / "pairs.bin", [_jpeg(rng, 64) for _ in range(40)], [i % 2 == 0 for i in range(20)])

    assert main([str(final), "--bin", str(bin_path), "--batch-size", "16"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = evaluate_verification(model, load_verification_set(bin_path, (64, 64)), 16, torch.device("cpu"))
    assert printed["set"] == "pairs"
    for key, value in expected.items():
        assert printed[key] == value, key
    assert 0.0 <= printed["accuracy"] <= 1.0 and "tar_at_far_1e-3" in printed
