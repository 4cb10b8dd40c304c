"""Tiny real images and datasets for the RecordIO / packer tests (made with PIL, in tmp_path)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.pack import write_insightface_dataset


def jpeg_bytes(seed: int, size: int = 16, mode: str = "RGB") -> bytes:
    """A noise JPEG of ``size``x``size`` pixels, different for every seed."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bytes(seed: int, size: int = 16) -> bytes:
    """A noise RGBA PNG (alpha forces the packer to re-encode it)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 4), dtype=np.uint8), mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def insightface_dataset(out_dir: Path, counts: Sequence[int], size: int = 16) -> list[tuple[int, bytes]]:
    """Write an insightface dataset with ``counts[c]`` images of class c; returns the samples written."""
    samples = [(label, jpeg_bytes(100 * label + i, size)) for label, n in enumerate(counts) for i in range(n)]
    write_insightface_dataset(out_dir, samples, len(counts), (size, size))
    return samples


def identity_folders(root: Path, counts: Sequence[int], size: int = 16) -> Path:
    """``root/id_XX/img_YY.jpg`` folders with ``counts[c]`` JPEGs for identity c (sorted names = labels)."""
    for label, n in enumerate(counts):
        folder = root / f"id_{label:02d}"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"img_{i:02d}.jpg").write_bytes(jpeg_bytes(100 * label + i, size))
    return root
