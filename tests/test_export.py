"""Specification of backbone export: ONNX that onnxruntime runs identically, safe weights I/O."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fr_train.backbones import build_backbone
from fr_train.export import (
    ONNX_INPUT_NAME,
    ONNX_OUTPUT_NAME,
    UnsafeWeightsError,
    export_onnx,
    load_backbone,
    load_backbone_weights,
    save_backbone,
    verify_onnx,
)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _images(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1


def _trained_looking(name: str, seed: int = 0) -> nn.Module:
    """A backbone with non-trivial BN affine params and PReLU slopes and with BN running statistics
    calibrated on data, so that a wrong BN folding (train-mode stats, swapped mean/var, dropped bias)
    cannot go unnoticed and activations have realistic magnitudes."""
    torch.manual_seed(seed)
    model = build_backbone(name)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            if m.weight.requires_grad:
                m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.momentum = None  # cumulative average over the calibration batches
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
        model.train()(_images(4, seed=100))
    for m in norms:
        m.momentum = 0.1
    return model  # left in train mode: export must switch to eval itself


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_onnx_export_matches_torch_in_eval_mode_for_batch_1_and_3(name: str, tmp_path: Path) -> None:
    model = _trained_looking(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    assert model.training, "export must not change the caller's module mode"

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == [ONNX_INPUT_NAME]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CI cores
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    reference = model.eval()
    for batch, seed in [(1, 10), (3, 11)]:
        x = _images(batch, seed)
        with torch.no_grad():
            expected = reference(x).numpy()
        (got,) = session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: x.numpy()})
        assert got.shape == (batch, 512)
        assert _cosine(got, expected).min() >= 0.999
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_static_batch_export_has_a_fixed_batch_dimension(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = export_onnx(build_backbone("mbf"), tmp_path / "static.onnx", dynamic_batch=False)
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 1 and not dim0.dim_param


def test_verify_onnx_accepts_the_exported_model_and_rejects_other_weights(tmp_path: Path) -> None:
    model = _trained_looking("mbf", seed=0)
    path = export_onnx(model, tmp_path / "a.onnx")
    check = verify_onnx(model, path, batch_sizes=(1, 3))
    assert check.batch_sizes == (1, 3) and check.min_cosine >= 0.999 and check.max_abs_diff < 1e-3
    with pytest.raises(ValueError, match=r"a\.onnx: ONNX and torch embeddings disagree"):
        verify_onnx(_trained_looking("mbf", seed=1), path, batch_sizes=(2,))


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="dynamo exporter needs onnxscript")
def test_dynamo_exporter_matches_torch(tmp_path: Path) -> None:
    model = _trained_looking("mbf")
    path = export_onnx(model, tmp_path / "dyn.onnx", exporter="dynamo")
    assert verify_onnx(model, path, batch_sizes=(1, 3)).min_cosine >= 0.999


# ------------------------------------------------------------------------------------------ weights


def test_safetensors_round_trip_restores_identical_embeddings(tmp_path: Path) -> None:
    model = _trained_looking("r18").eval().to(memory_format=torch.channels_last)
    path = save_backbone(model, tmp_path / "r18.safetensors", metadata={"backbone": "r18"})
    state = load_backbone_weights(path)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key

    restored = load_backbone("r18", path).eval()
    x = _images(2, seed=5)
    with torch.no_grad():
        expected = model(x.contiguous(memory_format=torch.channels_last))
        # Same weights; only the conv kernels differ (channels_last vs NCHW), hence float tolerance.
        torch.testing.assert_close(restored(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "backbone": "r18"}


def test_save_requires_a_safetensors_file_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.pt: backbones are saved as safetensors"):
        save_backbone(nn.Linear(2, 2), tmp_path / "model.pt")


def test_plain_torch_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "state_dict_backbone": model.state_dict()}, tmp_path / "ckpt.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(load_backbone_weights(tmp_path / "sd.pt")[key], value)
        assert torch.equal(load_backbone_weights(tmp_path / "ckpt.pt", key="state_dict_backbone")[key], value)
    with pytest.raises(ValueError, match=r"ckpt\.pt: entry 'epoch' is a int, not a tensor.*key="):
        load_backbone_weights(tmp_path / "ckpt.pt")
    with pytest.raises(KeyError, match=r"no entry 'backbone'.*state_dict_backbone"):
        load_backbone_weights(tmp_path / "ckpt.pt", key="backbone")


def test_loading_into_the_wrong_backbone_names_the_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_backbone(build_backbone("mbf", embedding_size=128), tmp_path / "mbf128.safetensors")
    with pytest.raises(
        ValueError, match=r"mbf128\.safetensors: does not match backbone 'mbf'.*shape mismatches"
    ):
        load_backbone("mbf", path)
    with pytest.raises(ValueError, match=r"does not match backbone 'r18': missing \['bn1\.bias'"):
        load_backbone("r18", path)
    assert load_backbone("mbf", path, embedding_size=128).embedding_size == 128


def test_missing_and_corrupt_files_are_reported_by_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_backbone_weights(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a valid safetensors file"):
        load_backbone_weights(tmp_path / "junk.safetensors")


def _mark_code_ran(marker: str) -> dict[str, torch.Tensor]:
    """What a malicious pickle would execute: here, harmlessly, touching a marker file."""
    Path(marker).write_text("pwned")
    return {}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_mark_code_ran, (str(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_no_code_runs(writer: str, tmp_path: Path) -> None:
    """Both a torch zip checkpoint carrying a payload and a bare pickle whose first object is one."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"fc.weight": torch.zeros(2), "x": _Payload(marker)}, path)
    else:
        with path.open("wb") as f:
            pickle.dump(_Payload(marker), f, protocol=2)

    with pytest.raises(UnsafeWeightsError, match=r"evil\.pt: refused to load"):
        load_backbone_weights(path)
    assert not marker.exists(), "the loader executed code from the pickle"

    # The file really is dangerous: an unrestricted load runs the payload (proves the test can fail).
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with path.open("rb") as f:
            pickle.load(f)
    assert marker.read_text() == "pwned"


def test_a_finished_runs_model_loads_from_its_run_or_final_directory(tmp_path: Path) -> None:
    """What distillation reads as its teacher: RUN/final's safetensors + model.json, strictly."""
    import json

    from fr_train.export import load_saved_model

    model = build_backbone("mbf", embedding_size=128, image_size=32).eval()
    final = tmp_path / "run" / "final"
    save_backbone(model, final / "backbone.safetensors")
    (final / "model.json").write_text(json.dumps({"backbone": "mbf", "embedding_size": 128, "image_size": 32}))
    x = torch.randn(2, 3, 32, 32)
    for where in (tmp_path / "run", final):
        loaded, info = load_saved_model(where)
        assert info["embedding_size"] == 128 and not loaded.training
        torch.testing.assert_close(loaded(x), model(x))
    (final / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.json: not found; pass a finished fr_train run's final/"):
        load_saved_model(final)
