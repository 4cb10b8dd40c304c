"""P×K batches for the sample-to-sample losses (triplet, contrastive): every global batch holds K
images of each of P identities, so every anchor has positives and the negatives are other faces.

DALI's own reader shuffles records in file order inside a window, so a batch of an identity-sorted
``.rec`` would hold few identities and a shuffled one almost no positive pairs. Here the global
batch is drawn in Python by :class:`PKSchedule` and read, sliced and decoded by the scheduled
iterator (data_pipeline/scheduled.py: the same global batches at any world size). Each epoch visits
the identities in a fresh random order, P per batch (``⌊#identities / P⌋`` batches); an identity
with fewer than K images repeats some; the random flips are drawn with the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.dali import DaliConfig
from data_pipeline.scheduled import Schedule, ScheduledFaceIterator

_STATE_FORMAT = "fr_train.pk_iterator/1"


class PKSchedule:
    """Global P×K batches over images with ``labels`` (index order): pure, the same on every rank."""

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int) -> None:
        if p < 2 or k < 2:
            raise ValueError(f"a P×K batch needs P >= 2 identities and K >= 2 images each, got P={p}, K={k}")
        self.labels, self.p, self.k, self.seed = np.asarray(labels, dtype=np.int64), p, k, seed
        self.identities = np.unique(self.labels)
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], self.identities)
        self.images_of = dict(zip(self.identities.tolist(), np.split(order, bounds[1:]), strict=True))
        self.batches_per_epoch = len(self.identities) // p
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.identities)} identities, fewer than P={p} per batch: "
                             "lower data.batch_size or data.pk_images_per_identity's P = global batch / K")

    def global_batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices [P·K], identities contiguous; mirror flags [P·K]) of global batch ``batch``."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} is not in an epoch of {self.batches_per_epoch} batches")
        order = np.random.default_rng([self.seed, epoch]).permutation(self.identities)
        chosen = order[batch * self.p:(batch + 1) * self.p]
        rng = np.random.default_rng([self.seed, epoch, batch, 1])
        picks = [rng.choice(self.images_of[int(c)], self.k, replace=len(self.images_of[int(c)]) < self.k)
                 for c in chosen]
        return np.concatenate(picks), rng.integers(0, 2, self.p * self.k, dtype=np.int32)


class PKFaceIterator(ScheduledFaceIterator):
    """One rank's P×K batches (data_pipeline/scheduled.py: slices, accumulation, positions).
    ``config.batch_size`` is this rank's micro-batch; the global batch
    ``batch_size × world_size × micro_batches`` must be a multiple of ``k``."""

    STATE_FORMAT = _STATE_FORMAT

    def __init__(self, dataset_dir: str | Path, config: DaliConfig, *, k: int, rank: int, world_size: int,
                 micro_batches: int = 1) -> None:
        global_batch = config.batch_size * world_size * micro_batches
        if global_batch % k:
            raise ValueError(f"data.pk_images_per_identity={k} must divide the global batch {global_batch} "
                             f"(data.batch_size {config.batch_size} × {world_size} ranks × {micro_batches} "
                             "accumulated micro-batches)")
        self.k = k
        super().__init__(dataset_dir, config, rank=rank, world_size=world_size, micro_batches=micro_batches)

    def _make_schedule(self) -> Schedule:
        return PKSchedule(self.index.labels, self.global_batch_size // self.k, self.k, self.config.seed)

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "k": self.k}
