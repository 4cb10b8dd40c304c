"""Per-image embeddings of an IJB release: decode, align by five points, embed (and the mirror), keep.

IJB-C is 469,375 loose crops. Extraction is the slow part of an evaluation (hours on a CPU,
minutes on a GPU), scoring is seconds, so the raw per-image embeddings — of the aligned crop and
of its horizontal mirror, both un-normalised — are what ``--features FILE`` keeps: re-scoring
with ``--no-flip``, ``--no-norm-weight`` or ``--no-detector-weight`` reads them back. The
detector scores are not stored: they come from the release's landmark file at scoring time.

Decoding and warping (OpenCV, GIL-free) run on a thread pool, a batch ahead of the model.
The features file is an array file (data_pipeline/array_file.py: CRC-checked, atomic); its meta
names the image list (a digest), the model (its file's size and CRC-32) and whether mirrors were
embedded, so a file made for another release or model is refused instead of silently scored.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data_pipeline.array_file import file_crc32, read_array_file, write_array_file
from data_pipeline.errors import data_error
from data_pipeline.face_align import align_face
from data_pipeline.five_points import FivePoints
from fr_train.evaluation.embedders import Embedder

FEATURES_FORMAT = "fr_eval.ijb_features/1"


@dataclass(frozen=True)
class ImageFeatures:
    """``emb[i]`` (and ``emb_flip[i]``, None when mirrors were not embedded) is the embedding of ``names[i]``."""

    names: list[str]
    emb: np.ndarray  # (n, d) float32
    emb_flip: np.ndarray | None


def names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def model_fingerprint(embedder: Embedder) -> str:
    """``SIZE:CRC32`` of the model's file (weights or ONNX): the same bytes give the same features."""
    source = getattr(embedder, "source", None)
    if source is None or not Path(source).is_file():
        return f"unknown:{embedder.name}"
    return f"{Path(source).stat().st_size}:{file_crc32(source):08x}"


def _read_aligned(path: Path, points: np.ndarray, size: int) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise data_error(path, "", "cannot be decoded as an image", "Replace it with the release's JPEG/PNG")
    return align_face(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), points, size)


def check_images(images_dir: Path, names: list[str], landmarks: FivePoints) -> list[int]:
    """Each image's landmark row; refuses (before any work) an image without landmarks or absent on disk."""
    rows = []
    for name in names:
        row = landmarks.row_of.get(name)
        if row is None:
            raise data_error(landmarks.path, "", f"has no line for image {name!r} (listed in the tid/mid file)",
                             "Use the landmark file of the same release as the tid/mid file")
        rows.append(row)
    for name in names:
        if not (images_dir / name).is_file():
            raise data_error(images_dir / name, "", "listed in the tid/mid file but absent",
                             f"Restore the release's images under {images_dir}")
    return rows


def _batches(images_dir: Path, names: list[str], points: np.ndarray, size: int, batch: int,
             pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """Aligned uint8 RGB batches in order; the next batch decodes while the model runs on this one."""
    def load(lo: int) -> np.ndarray:
        hi = min(lo + batch, len(names))
        return np.stack(list(pool.map(lambda i: _read_aligned(images_dir / names[i], points[i], size), range(lo, hi))))

    with ThreadPoolExecutor(max_workers=1) as ahead:
        starts = range(0, len(names), batch)
        pending = ahead.submit(load, starts[0]) if starts else None
        for k in range(len(starts)):
            current = pending.result()  # type: ignore[union-attr]
            pending = ahead.submit(load, starts[k + 1]) if k + 1 < len(starts) else None
            yield current


def extract_features(embedder: Embedder, images_dir: Path, names: list[str], landmarks: FivePoints, *,
                     flip: bool = True, batch_size: int = 128, threads: int = 4,
                     progress: bool | None = None) -> ImageFeatures:
    """Embed every image in ``names`` (aligned by its landmarks) and, with ``flip``, its mirror."""
    from tqdm import tqdm

    rows = check_images(images_dir, names, landmarks)
    points = landmarks.points[rows]
    show = sys.stderr.isatty() if progress is None else progress
    embs, flips = [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, \
            tqdm(total=len(names), unit="img", desc="fr_eval: embedding", disable=not show, file=sys.stderr) as bar:
        for batch in _batches(images_dir, names, points, embedder.image_size, batch_size, pool):
            embs.append(embedder(batch))
            if flip:
                flips.append(embedder(batch[:, :, ::-1]))
            bar.update(len(batch))
    return ImageFeatures(names=names, emb=np.concatenate(embs).astype(np.float32),
                         emb_flip=np.concatenate(flips).astype(np.float32) if flip else None)


def save_features(path: Path, features: ImageFeatures, model: str) -> Path:
    arrays = {"emb": features.emb, "names": np.frombuffer("\n".join(features.names).encode("utf-8"), np.uint8)}
    if features.emb_flip is not None:
        arrays["emb_flip"] = features.emb_flip
    meta = {"format": FEATURES_FORMAT, "images": len(features.names), "names_sha256": names_digest(features.names),
            "model": model, "flip": features.emb_flip is not None}
    return write_array_file(path, meta, arrays)


def load_features(path: Path, names: list[str], model: str, flip: bool) -> ImageFeatures:
    """The features saved at ``path`` for exactly these images and this model; DataFormatError otherwise
    (the file is never overwritten: the user chooses to delete it or pass another path)."""
    keep = f"Pass another --features path to extract anew, or delete {path} if it is no longer wanted"
    loaded = read_array_file(path)
    if loaded is None or loaded[0].get("format") != FEATURES_FORMAT:
        raise data_error(path, "", "is not an fr_eval features file, or is damaged (CRC mismatch)", keep)
    meta, arrays = loaded
    if meta["names_sha256"] != names_digest(names):
        raise data_error(path, "", f"holds features of another image list ({meta['images']} images; this "
                         f"release lists {len(names)})", keep)
    if meta["model"] != model:
        raise data_error(path, "", f"was extracted by another model ({meta['model']}; this one is {model})", keep)
    if flip and not meta["flip"]:
        raise data_error(path, "", "holds no mirror embeddings (extracted with --no-flip)",
                         "Re-score with --no-flip, or " + keep[0].lower() + keep[1:])
    return ImageFeatures(names=names, emb=np.asarray(arrays["emb"]),
                         emb_flip=np.asarray(arrays["emb_flip"]) if flip else None)


__all__ = ["ImageFeatures", "check_images", "extract_features", "load_features", "model_fingerprint", "save_features"]
