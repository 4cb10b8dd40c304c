"""The raw-pixel baseline: the verification accuracy of correlating pixels, the floor any learned
model must beat on a set (a set where it is high tests nothing). Every learning test and benchmark
reports it beside the model's accuracy on the same pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.binset import decode_image, read_bin
from fr_train.evaluation.verification import VerificationResult, evaluate_distances


def raw_pixel_distances(images: list[bytes], source: str | Path) -> np.ndarray:
    """Squared L2 distance ``2 - 2·corr`` of each pair's flattened pixels, each image mean-centred
    and L2-normalised first (so the cosine is the Pearson correlation of the two images)."""
    dist = np.empty(len(images) // 2)
    for p in range(dist.size):
        a, b = (decode_image(images[2 * p + k], source=source, index=2 * p + k).reshape(-1).astype(np.float64)
                for k in (0, 1))
        a -= a.mean()
        b -= b.mean()
        # einsum, not BLAS dot: a multi-threaded BLAS on a busy machine is 100x slower for one vector
        dot, aa, bb = np.einsum("i,i->", a, b), np.einsum("i,i->", a, a), np.einsum("i,i->", b, b)
        dist[p] = 2.0 - 2.0 * dot / np.sqrt(aa * bb)
    return dist


def raw_pixel_baseline(bin_path: str | Path) -> VerificationResult:
    """The 10-fold verification accuracy of raw-pixel correlation on a ``.bin``: the floor any
    learned model must beat (a dataset where this is high tests nothing)."""
    images, issame = read_bin(bin_path)
    return evaluate_distances(raw_pixel_distances(images, bin_path), issame)
