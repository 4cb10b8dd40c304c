"""`fr_eval`: a saved backbone scored on .bin sets gives the numbers the training loop computes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.binset import write_bin
from data_pipeline.errors import DataFormatError
from data_pipeline.synthetic import SyntheticConfig, write_synthetic_dataset
from fr_train.backbones import build_backbone
from fr_train.evaluation.cli import main
from fr_train.evaluation.embedders import InputNorm
from fr_train.evaluation.runner import evaluate_verification, load_verification_set
from fr_train.export import save_backbone


def _jpeg(rng: np.random.Generator, size: int, width: int | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, width or size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _saved_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    final = tmp_path / "final"
    final.mkdir()
    save_backbone(build_backbone("mbf", image_size=64).eval(), final / "backbone.safetensors")
    (final / "model.json").write_text(json.dumps({"backbone": "mbf", "embedding_size": 512, "image_size": 64}))
    return final


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


def test_an_onnx_export_scores_a_bin_set_like_the_model_and_states_its_normalisation(tmp_path, capsys):
    from fr_train.evaluation.embedders import OnnxEmbedder
    from fr_train.evaluation.runner import embed_images
    from fr_train.export import export_onnx

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_backbone("mbf", image_size=64).eval()
    onnx = export_onnx(model, tmp_path / "model.onnx", image_size=64)
    bin_path = write_bin(tmp_path / "pairs.bin", [_jpeg(rng, 64) for _ in range(40)], [i % 2 == 0 for i in range(20)])
    assert main([str(onnx), "--bin", str(bin_path), "--batch-size", "16", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = evaluate_verification(model, load_verification_set(bin_path, (64, 64)), 16, torch.device("cpu"))
    assert printed["accuracy"] == pytest.approx(expected["accuracy"], abs=0.05 + 1e-9)  # one pair of 20 may flip
    images = load_verification_set(bin_path, (64, 64)).images
    torch_emb = embed_images(_torch_embedder(model), images, 16)
    onnx_emb = embed_images(OnnxEmbedder(onnx), images, 16)
    np.testing.assert_allclose(onnx_emb, torch_emb, atol=1e-4)
    # a model trained on BGR in [0, 1] says so; the ONNX model then sees other numbers
    bgr = embed_images(OnnxEmbedder(onnx, norm=InputNorm(mean=0.0, std=255.0, bgr=True)), images, 16)
    assert not np.allclose(bgr, torch_emb, atol=1e-3)


def _torch_embedder(model: torch.nn.Module):
    from fr_train.evaluation.embedders import TorchEmbedder

    return TorchEmbedder(model, torch.device("cpu"), 64)


def test_a_square_set_of_another_size_is_resized_to_the_model(tmp_path, capsys):
    rng = np.random.default_rng(1)
    bin_path = write_bin(tmp_path / "big.bin", [_jpeg(rng, 80) for _ in range(40)], [i % 2 == 0 for i in range(20)])
    assert load_verification_set(bin_path, (64, 64)).images.shape == (40, 3, 64, 64)
    assert main([str(_saved_model(tmp_path)), "--bin", str(bin_path), "--batch-size", "20"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["set"] == "big"


def test_non_square_images_are_refused_naming_the_file_and_the_image(tmp_path, capsys):
    """Resizing a 64x48 face to 64x64 squashes it: the set is refused, not scored on distorted faces."""
    rng = np.random.default_rng(2)
    images = [_jpeg(rng, 64) for _ in range(40)]
    images[7] = _jpeg(rng, 48, width=64)
    bin_path = write_bin(tmp_path / "wide.bin", images, [i % 2 == 0 for i in range(20)])
    message = r"wide\.bin: images\[7\]: is 64x48 \(WxH\), not square; .*aligned square face crops"
    with pytest.raises(DataFormatError, match=message):
        load_verification_set(bin_path, (64, 64))
    assert main([str(_saved_model(tmp_path)), "--bin", str(bin_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fr_eval: error: ") and "wide.bin: images[7]: is 64x48" in err[0]


@pytest.mark.parametrize(("issame", "problem"), [
    ([], r"0 pair\(s\): the 10-fold protocol needs at least 10 pairs"),
    ([True, False, True], r"3 pair\(s\): the 10-fold protocol needs at least 10 pairs"),
    ([True] * 12, r"all 12 pairs are genuine \(same identity\): .*need both genuine and impostor pairs"),
    ([False] * 12, r"all 12 pairs are impostor \(different identities\)"),
])
def test_sets_the_protocol_cannot_score_are_refused_naming_the_file(tmp_path, capsys, issame, problem):
    rng = np.random.default_rng(3)
    bin_path = write_bin(tmp_path / "few.bin", [_jpeg(rng, 64) for _ in range(2 * len(issame))], issame)
    with pytest.raises(DataFormatError, match=rf"few\.bin: issame: {problem}"):
        load_verification_set(bin_path, (64, 64))
    assert main([str(_saved_model(tmp_path)), "--bin", str(bin_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fr_eval: error: ") and "few.bin: issame:" in err[0]


def test_a_missing_set_is_one_line_on_stderr(tmp_path, capsys):
    assert main([str(_saved_model(tmp_path)), "--bin", str(tmp_path / "nope.bin")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.bin" in err[0]


def test_the_synthetic_default_validation_set_still_loads(tmp_path):
    """The trainer evaluates on the synthetic default's synth_val.bin through the same loader."""
    cfg = SyntheticConfig(num_identities=2, images_per_identity=2, holdout_identities=2, num_pairs=10, image_size=32)
    out = write_synthetic_dataset(tmp_path / "synth", cfg, workers=1)
    vs = load_verification_set(out / "synth_val.bin", (32, 32))
    assert vs.images.shape == (20, 3, 32, 32) and vs.issame.sum() == 5


@pytest.mark.parametrize(("device", "says"), [
    ("garbage", "'garbage' is not a device: pass cpu, cuda or cuda:N"),
    ("meta", "'meta': fr_eval runs on cpu or cuda[:N]"),
    pytest.param("cuda", "'cuda': this machine has no CUDA device; pass --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_a_device_this_machine_lacks_is_one_line_naming_the_flag(tmp_path, capsys, device, says):
    """Issue 26: `--device garbage` ended in a torch traceback after the model was built."""
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--bin", str(tmp_path / "x.bin"), "--device", device])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"argument --device: {says}"), err


def _model_problems(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "good").mkdir()
    good = _saved_model(tmp_path / "good")
    r18 = tmp_path / "r18"
    r18.mkdir()
    save_backbone(build_backbone("r18", embedding_size=512, image_size=112), r18 / "backbone.safetensors")
    (r18 / "model.json").write_text(json.dumps({"backbone": "mbf", "embedding_size": 512, "image_size": 112}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "model.json").write_text((good / "model.json").read_text())
    bad_json = tmp_path / "bad_json"
    shutil.copytree(good, bad_json)
    (bad_json / "model.json").write_text('{"backbone": ')
    return [
        ([str(tmp_path / "missing")], "missing: no such model directory or weights file"),
        ([str(no_weights)], "backbone.safetensors: weights file not found"),
        ([str(bad_json)], "model.json: Expecting value"),
        ([str(r18)], "does not match backbone 'mbf'"),
        ([str(good), "--backbone", "r999"], "unknown backbone 'r999'"),
    ]


def test_a_model_that_cannot_be_loaded_is_one_line_naming_the_file(tmp_path, capsys):
    """Issue 26: each of these ended in a traceback (a state-dict key dump for another backbone)."""
    for args, says in _model_problems(tmp_path):
        assert main([*args, "--bin", str(tmp_path / "x.bin"), "--device", "cpu"]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fr_eval: error: ") and says in err[0], (args, err)


def test_a_batch_size_below_one_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--bin", "x.bin", "--batch-size", "0"])
    assert "argument --batch-size: '0': must be >= 1" in capsys.readouterr().err


def test_weights_without_model_json_or_backbone_are_a_usage_error_naming_the_flag(tmp_path, capsys):
    weights = tmp_path / "bare.safetensors"
    save_backbone(build_backbone("mbf", image_size=64).eval(), weights)
    assert main([str(weights), "--bin", str(tmp_path / "x.bin"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fr_eval: no model.json beside {weights}; pass --backbone"]
