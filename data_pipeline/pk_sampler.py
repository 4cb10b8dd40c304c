"""P×K batches for the sample-to-sample losses (triplet, contrastive): every global batch holds K
images of each of P identities, so every anchor has positives and the negatives are other faces.

DALI's own reader shuffles records in file order inside a window, so a batch of an identity-sorted
``.rec`` would hold few identities and a shuffled one almost no positive pairs. Here the global
batch is drawn in Python from the image index (record keys and labels) and fed to DALI by
``fn.external_source`` (encoded bytes, read through the memory-mapped RecordIO reader), then
decoded and augmented by the same DALI operators as the default pipeline (``mixed`` on a GPU).

The schedule is a pure function of ``(seed, epoch, batch)``: every rank computes the same global
batch without talking to the others and takes its contiguous slice of ``data.batch_size``
samples; the random flips are drawn with it. Each epoch visits the identities in a fresh random
order, P per batch (``⌊#identities / P⌋`` batches); an identity with fewer than K images repeats
some. A resume needs only ``(epoch, batch)``, on any world size with the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipeline.dali import DaliConfig, FaceBatch, import_dali, load_dali_index
from data_pipeline.dataset import open_dataset

if TYPE_CHECKING:
    from nvidia.dali import Pipeline

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


class PKFaceIterator:
    """One rank's P×K batches as :class:`FaceBatch` (the DaliFaceIterator interface: ``len``, epochs,
    ``reset``, ``state_dict``). ``config.batch_size`` is this rank's share; the global batch
    ``batch_size × world_size`` must be a multiple of ``k``."""

    def __init__(self, dataset_dir: str | Path, config: DaliConfig, *, k: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        global_batch = config.batch_size * world_size
        if global_batch % k:
            raise ValueError(f"data.pk_images_per_identity={k} must divide the global batch {global_batch} "
                             f"(data.batch_size {config.batch_size} × {world_size} ranks)")
        self.config, self.k, self.rank, self.world_size = config, k, rank, world_size
        self.index = load_dali_index(dataset_dir)
        self.dataset = open_dataset(dataset_dir)
        self.schedule = PKSchedule(self.index.labels, global_batch // k, k, config.seed)
        self.epoch = 0
        self._batch = 0  # batches yielded in this epoch
        self._fed = 0  # global batch counter of the next batch the pipeline asks for
        self._pipe = self._build(0)

    def _build(self, start: int) -> Pipeline:
        dali = import_dali()
        fn, types = dali.fn, dali.types
        self._fed = start
        c = self.config
        pipe = dali.Pipeline(batch_size=c.batch_size, num_threads=c.num_threads, device_id=c.device_id,
                             seed=c.seed, prefetch_queue_depth=c.prefetch_queue_depth)
        height, width = self.index.image_size
        with pipe:
            encoded, labels, mirror, keys = fn.external_source(source=self._source, num_outputs=4, batch=True,
                                                               dtype=[types.UINT8, types.INT64, types.INT32,
                                                                      types.INT64])
            images = fn.decoders.image(encoded, device="mixed" if c.device == "gpu" else "cpu", output_type=types.RGB)
            if c.resize:
                images = fn.resize(images, resize_x=width, resize_y=height)
            images = fn.crop_mirror_normalize(
                images, mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3, output_layout="CHW",
                dtype=types.FLOAT16 if c.dtype == "float16" else types.FLOAT)
            pipe.set_outputs(images, labels, keys)
        pipe.build()
        return pipe

    def _source(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """DALI asks for batches in order (ahead, to prefetch): the n-th call is global batch n."""
        epoch, batch = divmod(self._fed, self.schedule.batches_per_epoch)
        self._fed += 1
        indices, mirror = self.schedule.global_batch(epoch, batch)
        if not self.config.flip:
            mirror = np.zeros_like(mirror)
        mine = slice(self.rank * self.config.batch_size, (self.rank + 1) * self.config.batch_size)
        keys = self.index.keys[indices[mine]]
        encoded, labels = [], []
        for key in keys.tolist():
            label, data = self.dataset.read_image(int(key))
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(np.array(label, dtype=np.int64))
        return (encoded, labels, [np.array(m, dtype=np.int32) for m in mirror[mine]],
                [np.array(k, dtype=np.int64) for k in keys])

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cuda", self.config.device_id) if self.config.device == "gpu" else torch.device("cpu")

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch

    def __iter__(self) -> Iterator[FaceBatch]:
        if self._batch == len(self):
            self.reset()
        return self

    def __next__(self) -> FaceBatch:
        if self._batch == len(self):
            raise StopIteration
        images_tl, labels_tl, keys_tl = self._pipe.run()
        self._batch += 1
        return self._convert(images_tl, labels_tl, keys_tl)

    def reset(self) -> None:
        """Skip what is left of this epoch and start the next."""
        while self._batch < len(self):
            self._pipe.run()
            self._batch += 1
        self.epoch += 1
        self._batch = 0

    def _convert(self, images_tl: Any, labels_tl: Any, keys_tl: Any) -> FaceBatch:
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        height, width = self.index.image_size
        shapes = {tuple(s) for s in images_tl.shape()}
        if shapes != {(3, height, width)}:
            raise RuntimeError(f"{self.index.rec_path}: decoded images of shapes {sorted(shapes)}, the property file "
                               f"says 3x{height}x{width}: set DaliConfig.resize=True or re-pack at that size")
        device = self.device
        dtype = torch.float16 if self.config.dtype == "float16" else torch.float32
        images = torch.empty((self.config.batch_size, 3, height, width), dtype=dtype, device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(images_tl.as_tensor(), images, cuda_stream=stream)
        labels = np.asarray(labels_tl.as_tensor()).astype(np.int64).reshape(-1)
        keys = np.asarray(keys_tl.as_tensor()).astype(np.int64).reshape(-1)
        return FaceBatch(images=images, labels=torch.from_numpy(labels).to(device), num_valid=len(keys),
                         keys=torch.from_numpy(keys))

    # -- checkpoints ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"global_batch": self.config.batch_size * self.world_size, "k": self.k, "seed": self.config.seed,
                "flip": self.config.flip, "num_images": len(self.index)}

    def state_dict(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "epoch": self.epoch, "batch": self._batch, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved batch (any world size with the same global batch, K and seed)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a PKFaceIterator state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        diff = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the P×K sampler: {detail}")
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._pipe = self._build(self.epoch * len(self) + self._batch)

