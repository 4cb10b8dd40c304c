"""P×K batches for the sample-to-sample losses (triplet, contrastive): every global batch holds K
images of each of P identities, so every anchor has positives and the negatives are other faces.

DALI's own reader shuffles records in file order inside a window, so a batch of an identity-sorted
``.rec`` would hold few identities and a shuffled one almost no positive pairs. Here the global
batch is drawn in Python by :class:`PKSchedule` and read, sliced and decoded by the scheduled
iterator (data_pipeline/scheduled.py: the same global batches at any world size). Each epoch visits
the identities in a fresh random order (data_pipeline/shuffle.py), P per batch (``⌊#identities / P⌋`` batches); an identity
with fewer than K images repeats some; the random flips are drawn with the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.dali import DaliConfig, group_by_label
from data_pipeline.scheduled import Schedule, ScheduledFaceIterator
from data_pipeline.shuffle import Shuffle

_STATE_FORMAT = "fr_train.pk_iterator/2"  # 2: identity orders by data_pipeline/shuffle.py


class PKSchedule:
    """Global P×K batches over images with ``labels`` (index order): pure, the same on every rank.

    ``grouping`` is ``(by_label, label_starts)`` as the prepared index stores it (data_pipeline/dali.py:
    class ``c``'s images are ``by_label[label_starts[c]:label_starts[c + 1]]``); without it the grouping
    is computed from ``labels``. A batch costs O(P·K): the epoch's identity order is a pointwise
    permutation (data_pipeline/shuffle.py), not an array of all identities.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int,
                 grouping: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        if p < 2 or k < 2:
            raise ValueError(f"a P×K batch needs P >= 2 identities and K >= 2 images each, got P={p}, K={k}")
        self.p, self.k, self.seed = p, k, seed
        if grouping is None:
            labels = np.asarray(labels, dtype=np.int64)
            grouping = group_by_label(labels, int(labels.max()) + 1 if labels.size else 0)
        self.by_label, self.label_starts = grouping
        self.identities = np.flatnonzero(np.diff(self.label_starts) > 0)  # classes with images (8 B per class)
        self.batches_per_epoch = len(self.identities) // p
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {len(self.identities)} identities, fewer than P={p} per batch: "
                             "lower data.batch_size or data.pk_images_per_identity's P = global batch / K")

    def images_of(self, identity: int) -> np.ndarray:
        """Positions (index order) of the images of class ``identity``."""
        return self.by_label[self.label_starts[identity]:self.label_starts[identity + 1]]

    def global_batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices [P·K], identities contiguous; mirror flags [P·K]) of global batch ``batch``."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} is not in an epoch of {self.batches_per_epoch} batches")
        order = Shuffle(len(self.identities), [self.seed, epoch])  # O(1) to make: nothing kept per epoch
        chosen = self.identities[order(np.arange(batch * self.p, (batch + 1) * self.p))]
        rng = np.random.default_rng([self.seed, epoch, batch, 1])
        picks = []
        for c in chosen.tolist():
            images = self.images_of(c)
            picks.append(rng.choice(images, self.k, replace=len(images) < self.k))
        return np.concatenate(picks), rng.integers(0, 2, self.p * self.k, dtype=np.int32)


class PKFaceIterator(ScheduledFaceIterator):
    """One rank's P×K batches (data_pipeline/scheduled.py: slices, accumulation, positions).
    ``config.batch_size`` is this rank's micro-batch; the global batch
    ``batch_size × world_size × micro_batches`` must be a multiple of ``k``."""

    STATE_FORMAT = _STATE_FORMAT
    PREVIOUS_FORMAT = "fr_train.pk_iterator/1"  # a materialised identity permutation per batch

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
        return PKSchedule(self.index.labels, self.global_batch_size // self.k, self.k, self.config.seed,
                          grouping=(self.index.by_label, self.index.label_starts))

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "k": self.k}
