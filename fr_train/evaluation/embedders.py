"""What fr_eval scores: any face model, as one function from uint8 RGB crops to embeddings.

fr_eval reads three kinds of model and scores them with the same code (``.bin`` sets and IJB):
an fr_train ``final/`` directory, a safetensors (or ``.pt``) file with ``--backbone``, and an ONNX
file run by onnxruntime — insightface's released models are ONNX, so a user compares their own
model with the published ones without leaving the project. Each is wrapped as an
:class:`Embedder`: ``embedder(images)`` with images ``(n, H, W, 3)`` uint8 RGB gives ``(n, d)``
float32, un-normalised (the caller decides how to weight and normalise).

The input normalisation is the model's own and must be stated, not guessed: fr_train and
insightface's ONNX releases take ``(x − 127.5) / 127.5`` in RGB (:data:`ARCFACE_INPUT`); a model
trained otherwise passes ``--input-mean/--input-std/--input-bgr``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class InputNorm:
    """``(x − mean) / std`` per pixel, channels in RGB order unless ``bgr``."""

    mean: float = 127.5
    std: float = 127.5
    bgr: bool = False


ARCFACE_INPUT = InputNorm()


class Embedder(Protocol):
    image_size: int
    name: str
    source: Path | None  # the model's file, when it has one

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class ModelLoadError(ValueError):
    """The model file cannot be used as given; the message names the file and the fix."""


class MissingBackboneError(ModelLoadError):
    """A weights file without model.json and no ``--backbone``: the command line, not the file, lacks it."""


def _nchw(images: np.ndarray, norm: InputNorm) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"embedder: want (n, H, W, 3) RGB images, got {x.shape}")
    if norm.bgr:
        x = x[..., ::-1]
    return ((x.astype(np.float32) - norm.mean) / norm.std).transpose(0, 3, 1, 2)


class TorchEmbedder:
    """A torch backbone in eval mode on ``device``, in its own dtype (bf16 models run bf16)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, image_size: int, name: str = "model",
                 norm: InputNorm = ARCFACE_INPUT, source: Path | None = None) -> None:
        self.model, self.device, self.image_size, self.name, self.norm = model, device, image_size, name, norm
        self.source = source  # the weights file, which fingerprints saved features (ijb_features.py)
        self.dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            x = torch.from_numpy(np.ascontiguousarray(_nchw(images, self.norm)))
            return self.model(x.to(device=self.device, dtype=self.dtype)).float().cpu().numpy()
        finally:
            self.model.train(was_training)


class OnnxEmbedder:
    """An ONNX face model run by onnxruntime (CUDA provider where onnxruntime has one, else CPU).

    Its input must be NCHW float32 with 3 channels and a fixed square side (or a symbolic one, then
    ``image_size`` decides); anything else is refused when the model is opened, naming the shape."""

    def __init__(self, path: str | Path, image_size: int | None = None, norm: InputNorm = ARCFACE_INPUT,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        self.path, self.norm, self.name = Path(path), norm, Path(path).stem
        self.source = self.path
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types for a bad file
            raise ModelLoadError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]}); pass an "
                                 "ONNX face model (e.g. insightface's released w600k_r50.onnx)") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{self.path}: has {len(inputs)} inputs; a face model takes one image batch")
        shape = list(inputs[0].shape)
        fixed = [d if isinstance(d, int) else None for d in shape]
        ok = len(shape) == 4 and fixed[1] == 3 and (fixed[2] is None or fixed[2] == fixed[3] or fixed[3] is None)
        if not ok or inputs[0].type != "tensor(float)":
            raise ModelLoadError(f"{self.path}: input {inputs[0].name!r} is {inputs[0].type} of shape {shape}; fr_eval "
                                 "feeds NCHW float32 [N, 3, S, S] face crops: export the model with that input")
        side = fixed[2] or fixed[3]
        if side is not None and image_size is not None and side != image_size:
            raise ModelLoadError(f"{self.path}: takes {side}x{side} images, not the --image-size {image_size} asked for")
        self.image_size = int(side or image_size or 112)
        self.batch = fixed[0]  # a model exported for one batch size is fed exactly that many
        self.input_name = inputs[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(_nchw(images, self.norm))
        if self.batch is None or len(x) == self.batch:
            return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)
        out = []
        for lo in range(0, len(x), self.batch):
            part = x[lo:lo + self.batch]
            pad = self.batch - len(part)
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), np.float32)])
            out.append(np.asarray(self.session.run(None, {self.input_name: part})[0], np.float32)[:len(part) - pad])
        return np.concatenate(out)


def load_embedder(model: str | Path, *, backbone: str | None, embedding_size: int | None, image_size: int | None,
                  device: torch.device, norm: InputNorm = ARCFACE_INPUT) -> Embedder:
    """Open ``model`` (final/ directory, weights file + ``backbone``, or ``.onnx``) as an :class:`Embedder`.

    Raises ModelLoadError / ValueError / OSError naming the file and the fix."""
    from fr_train.export import MODEL_JSON, read_model_info
    from fr_train.export import load_backbone as load_weights

    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model directory or weights file")
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, image_size=image_size, norm=norm)
    if path.is_dir() and (path / "final" / MODEL_JSON).is_file():
        path = path / "final"  # a run directory: its final model
    weights = path / "backbone.safetensors" if path.is_dir() else path
    meta_path = weights.parent / MODEL_JSON
    name, emb, size = backbone, embedding_size, image_size
    if meta_path.is_file():
        try:
            saved = read_model_info(meta_path)
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{meta_path}: {e}") from None
        name = name or saved["backbone"]
        emb = emb or saved["embedding_size"]
        size = size or saved["image_size"]
    if name is None:
        raise MissingBackboneError(f"no model.json beside {weights}; pass --backbone")
    size = size or 112
    # Strict: a missing, unexpected or mis-shaped entry names the file and the backbone.
    net = load_weights(name, weights, embedding_size=emb or 512, image_size=size)
    return TorchEmbedder(net.to(device).eval(), device, size, name=weights.parent.name or name, norm=norm,
                         source=weights)


__all__ = ["ARCFACE_INPUT", "Embedder", "InputNorm", "MissingBackboneError", "ModelLoadError", "OnnxEmbedder", "TorchEmbedder",
           "load_embedder"]
