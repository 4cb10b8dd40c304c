"""Backbone weights I/O (safetensors, safe torch.load) and ONNX export with a numerical check.

Why safetensors: a `.pt`/`.pth` file is a pickle, and unpickling runs arbitrary code. Backbones are written
only as safetensors; `.pt`/`.pth` files (e.g. insightface's model-zoo `backbone.pth`) are read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from data_pipeline.atomic import atomic_path
from fr_train.backbones import build_backbone

SAFETENSORS_SUFFIX = ".safetensors"
MODEL_JSON = "model.json"
ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "embedding"


class UnsafeWeightsError(ValueError):
    """A weights file needs arbitrary code execution (a non-weights pickle) to load; it was refused."""


# ----------------------------------------------------------------------------------------------- weights


def save_backbone(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the model's state dict as a safetensors file (atomically: temp file + rename).

    Tensors are moved to CPU and made contiguous (channels_last weights are stored in NCHW order, the
    layout every loader expects). `metadata` is stored as string key/values in the file header.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(
            f"{path}: backbones are saved as safetensors; use a '{SAFETENSORS_SUFFIX}' file name"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", **dict(metadata or {})}
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"{path}: safetensors metadata must map str → str; offending entries: {bad}")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_backbone_weights(path: str | os.PathLike[str], key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a backbone state dict (CPU tensors) from `.safetensors`, or from a `.pt`/`.pth` without unpickling code.

    `key` selects a nested state dict inside a torch checkpoint (e.g. insightface's training checkpoints
    keep the backbone under "state_dict_backbone"). Raises `UnsafeWeightsError` for pickles that would
    execute code, and `ValueError` naming the file and entry for anything that is not a str → Tensor map.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if key is not None:
            raise ValueError(f"{path}: a safetensors file is a flat tensor map; key={key!r} does not apply")
        try:
            obj: object = load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ValueError(
                f"{path}: not a valid safetensors file ({exc}); re-save it with save_backbone"
            ) from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeWeightsError(
                f"{path}: refused to load: the pickle references objects other than tensors and plain "
                f"containers, and unpickling those can run arbitrary code. If you trust its origin, convert it "
                f"once to safetensors in a sandbox. Detail: {str(exc).splitlines()[0]}"
            ) from exc
        except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: unreadable torch checkpoint ({exc})") from exc
        if key is not None:
            if not isinstance(obj, Mapping) or key not in obj:
                keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
                raise KeyError(f"{path}: no entry {key!r} in the checkpoint; top-level entries: {keys}")
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (name → tensor), found a {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; if this is a training "
                f"checkpoint, pass key= naming the backbone's state dict (top-level entries: {sorted(map(str, obj))})"
            )
    return dict(obj)


def load_backbone(
    name: str, path: str | os.PathLike[str], key: str | None = None, **build_kwargs: object
) -> nn.Module:
    """Build backbone `name` and load `path` into it strictly; any missing/unexpected/mis-shaped entry is an error."""
    model = build_backbone(name, **build_kwargs)  # type: ignore[arg-type]
    state = load_backbone_weights(path, key=key)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = {
        k: (tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    }
    if missing or unexpected or shapes:
        hint = (
            " (a 'module.' prefix means it was saved from a DDP/DeepSpeed wrapper)"
            if any(k.startswith("module.") for k in unexpected)
            else ""
        )
        raise ValueError(
            f"{path}: does not match backbone {name!r}{hint}: missing {missing[:5]}{'…' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)}), shape mismatches (file, model) {dict(list(shapes.items())[:5])}"
        )
    model.load_state_dict(state, strict=True)
    return model


def write_model_info(directory: Path, *, backbone: str, embedding_size: int, image_size: int, steps: int) -> Path:
    """``model.json``: what a saved backbone is (fr_eval, distillation and load_saved_model read it)."""
    path = Path(directory) / MODEL_JSON
    path.write_text(json.dumps({"backbone": backbone, "embedding_size": embedding_size, "image_size": image_size,
                                "steps": steps}))
    return path


def read_model_info(path: Path) -> dict[str, Any]:
    """``model.json`` checked for the fields a model needs to be rebuilt."""
    info = json.loads(Path(path).read_text())
    missing = [k for k in ("backbone", "embedding_size", "image_size") if k not in info]
    if missing:
        raise ValueError(f"{path}: field(s) {missing} missing; it was not written by fr_train")
    return info


def load_saved_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A model fr_train saved at the end of a run: ``RUN/final`` (or ``RUN`` itself) holding
    ``backbone.safetensors`` and ``model.json`` (backbone, embedding_size, image_size). Loaded strictly,
    from safetensors (no pickle); returns the model in eval mode and model.json's facts."""
    directory = Path(path)
    if (directory / "final" / MODEL_JSON).is_file():
        directory = directory / "final"
    meta_path, weights = directory / MODEL_JSON, directory / "backbone.safetensors"
    for needed in (meta_path, weights):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not found; pass a finished fr_train run's final/ directory "
                                    "(it holds backbone.safetensors and model.json)")
    info = read_model_info(meta_path)
    model = load_backbone(info["backbone"], weights, embedding_size=int(info["embedding_size"]),
                          image_size=int(info["image_size"]))
    return model.eval(), info


# ----------------------------------------------------------------------------------------------- ONNX


@dataclass(frozen=True)
class OnnxCheck:
    """Agreement between the torch model and the ONNX file run by onnxruntime on random inputs."""

    batch_sizes: tuple[int, ...]
    min_cosine: float
    max_abs_diff: float


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    image_size: int = 112,
    opset: int = 17,
    dynamic_batch: bool = True,
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
) -> Path:
    """Export `model` in eval mode to ONNX with input `input` (N×3×S×S) and output `embedding` (N×D).

    The model itself is not modified: a CPU fp32 copy in eval mode is exported, so BatchNorm uses its
    running statistics and dropout is off. `exporter="torchscript"` needs only `onnx`; `"dynamo"` is
    torch's newer torch.export-based path and needs the `onnxscript` package.
    """
    path = Path(path)
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ImportError("exporter='dynamo' needs the 'onnxscript' package (pip install onnxscript)")
    # Export a detached float32 CPU copy: the caller's module keeps its device, dtype and train/eval state.
    export_model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    example = torch.randn(2 if dynamic_batch else 1, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [ONNX_INPUT_NAME], "output_names": [ONNX_OUTPUT_NAME]}
    if exporter == "torchscript":
        axes = {ONNX_INPUT_NAME: {0: "batch"}, ONNX_OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(
            export_model, (example,), str(path), dynamo=False, opset_version=opset, dynamic_axes=axes, **names
        )
    else:
        shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        torch.onnx.export(
            export_model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            external_data=False,
            **names,
        )
    import onnx

    onnx.checker.check_model(str(path))
    return path


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    batch_sizes: Sequence[int] = (1, 3),
    image_size: int = 112,
    min_cosine: float = 0.999,
    seed: int = 0,
) -> OnnxCheck:
    """Run the ONNX file with onnxruntime (CPU) and the eval-mode torch model on the same random inputs.

    Raises `ValueError` naming the file if any row's cosine similarity falls below `min_cosine` or an
    output shape differs; returns the measured agreement otherwise.
    """
    import numpy as np
    import onnxruntime as ort

    path = Path(path)
    reference = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    options = ort.SessionOptions()
    # No busy-waiting worker threads: this is a one-off check, often on cores shared with training.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst_cos, worst_abs = 1.0, 0.0
    for batch in batch_sizes:
        # Inputs in the training range [-1, 1].
        x = torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = reference(x).double()
        got = torch.from_numpy(
            np.asarray(session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: x.numpy()})[0])
        ).double()
        if got.shape != expected.shape:
            raise ValueError(
                f"{path}: batch {batch}: ONNX output shape {tuple(got.shape)} != torch {tuple(expected.shape)}"
            )
        cos = torch.nn.functional.cosine_similarity(got, expected, dim=1).min().item()
        worst_cos = min(worst_cos, cos)
        worst_abs = max(worst_abs, (got - expected).abs().max().item())
    if worst_cos < min_cosine:
        raise ValueError(
            f"{path}: ONNX and torch embeddings disagree: min cosine {worst_cos:.6f} < {min_cosine} "
            f"(max |diff| {worst_abs:.3g}) over batch sizes {list(batch_sizes)}"
        )
    return OnnxCheck(tuple(batch_sizes), worst_cos, worst_abs)
