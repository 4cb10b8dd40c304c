"""Global batches drawn in Python from a pure schedule, decoded by DALI: the same at any world size.

DALI's own reader (data_pipeline/dali.py) gives each rank a shard of the file and shuffles inside
it, so which images meet in a step depends on the number of ranks. A run that changes its size
(elastic, fr_train/train/batch_plan.py) must see the same images in the same step whatever the
size. Here a *schedule* names the images of every global batch as a pure function of
``(seed, epoch, batch)``; each rank computes it without talking to the others, takes its slice,
reads the encoded bytes through the memory-mapped RecordIO reader and feeds them to DALI with
``fn.external_source`` (decode ``mixed`` on a GPU, then the same operators as the default
pipeline). The random flips are part of the schedule, so the augmentation is size-independent too.

One global batch is one optimizer step of ``G`` images. With gradient accumulation it is cut into
``micro_batches`` global micro-batches of ``G / micro_batches`` images; rank ``r`` of ``W`` takes
rows ``[m·G/M + r·b, m·G/M + (r+1)·b)`` of micro-batch ``m`` (``b = G / (M·W)``, the pipeline's
batch size). The step's images are the same set for every ``(W, M)`` with ``b·W·M = G``.

Two schedules: :class:`PermutationSchedule` (``data.sampler=global``: one seeded order of all
images per epoch) and ``data_pipeline.pk_sampler.PKSchedule`` (``pk``: P identities × K images).
A position is ``(epoch, batch)``, so a checkpoint resumes on any world size with the same ``G``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from data_pipeline.dali import DaliConfig, FaceBatch, import_dali, load_dali_index
from data_pipeline.dataset import open_dataset
from data_pipeline.shuffle import Shuffle

if TYPE_CHECKING:
    from nvidia.dali import Pipeline


class Schedule(Protocol):
    batches_per_epoch: int

    def global_batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices [G] in index order, mirror flags [G]) of global batch ``batch`` of ``epoch``."""
        ...


class PermutationSchedule:
    """Every epoch visits the images in a fresh order seeded by ``(seed, epoch)`` (a pointwise
    permutation, data_pipeline/shuffle.py: no per-epoch array, O(G) per batch), cut into ``⌊N / G⌋``
    global batches of ``G`` (the last ``N mod G`` positions of the order, a different random subset of
    images each epoch, are left out: a padded sample would count twice in the loss)."""

    def __init__(self, num_images: int, global_batch: int, seed: int) -> None:
        if global_batch < 1:
            raise ValueError(f"the global batch must be >= 1 image, got {global_batch}")
        self.num_images, self.size, self.seed = num_images, global_batch, seed
        self.batches_per_epoch = num_images // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {num_images} images, fewer than one global batch of {global_batch}: "
                             "lower data.batch_size or run.grad_accum")

    def global_batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} is not in an epoch of {self.batches_per_epoch} batches")
        order = Shuffle(self.num_images, [self.seed, epoch])  # O(1) to make: nothing kept per epoch
        indices = order(np.arange(batch * self.size, (batch + 1) * self.size))
        mirror = np.random.default_rng([self.seed, epoch, batch, 1]).integers(0, 2, self.size, dtype=np.int32)
        return indices, mirror


class ScheduledFaceIterator:
    """One rank's batches of a schedule as :class:`FaceBatch` (the DaliFaceIterator interface: ``len``
    in micro-batches, epochs, ``reset``, ``state_dict``; plus :meth:`seek`). ``config.batch_size`` is
    this rank's micro-batch ``b``; the global batch is ``b × world_size × micro_batches``."""

    STATE_FORMAT = "fr_train.scheduled_iterator/2"  # 2: epoch orders by data_pipeline/shuffle.py
    PREVIOUS_FORMAT = "fr_train.scheduled_iterator/1"  # a materialised permutation per epoch

    def __init__(self, dataset_dir: str | Path, config: DaliConfig, *, rank: int, world_size: int,
                 micro_batches: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.config, self.rank, self.world_size, self.micro_batches = config, rank, world_size, micro_batches
        self.global_batch_size = config.batch_size * world_size * micro_batches
        self.index = load_dali_index(dataset_dir)
        self.dataset = open_dataset(dataset_dir)
        self.schedule = self._make_schedule()
        self.epoch = 0
        self._batch = 0  # micro-batches yielded in this epoch
        self._fed = 0  # micro-batch counter of the next one the pipeline asks for
        self._current: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self._pipe = self._build(0)

    def _make_schedule(self) -> Schedule:
        return PermutationSchedule(len(self.index), self.global_batch_size, self.config.seed)

    def _identity(self) -> dict[str, Any]:
        """What a saved position is only valid for (the world size is not part of it)."""
        return {"global_batch": self.global_batch_size, "seed": self.config.seed, "flip": self.config.flip,
                "num_images": len(self.index)}

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
        """DALI asks for micro-batches in order (ahead, to prefetch): the n-th call is micro-batch
        ``n mod M`` of global batch ``n div M`` counted from the start of training."""
        step_batch, micro = divmod(self._fed, self.micro_batches)
        self._fed += 1
        where = divmod(step_batch, self.schedule.batches_per_epoch)
        if self._current is None or self._current[0] != where:
            self._current = (where, *self.schedule.global_batch(*where))
        _, indices, mirror = self._current
        if not self.config.flip:
            mirror = np.zeros_like(mirror)
        b = self.config.batch_size
        start = micro * b * self.world_size + self.rank * b
        mine = slice(start, start + b)
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
        """Micro-batches per epoch (optimizer steps × micro_batches)."""
        return self.schedule.batches_per_epoch * self.micro_batches

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
        """Skip what is left of this epoch and start the next (no image of the rest is read)."""
        self.seek(self.epoch + 1, 0)

    def _convert(self, images_tl: Any, labels_tl: Any, keys_tl: Any) -> FaceBatch:
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        height, width = self.index.image_size
        shapes = {tuple(s) for s in images_tl.shape()}
        if shapes != {(3, height, width)}:
            raise RuntimeError(f"{self.index.rec_path}: decoded images of shapes {sorted(shapes)}, the property file "
                               f"says 3x{height}x{width}: re-pack the source images at that size (fr_pack --image-size "
                               f"{height} {width} --resize), or correct the property file if its size is wrong")
        device = self.device
        dtype = torch.float16 if self.config.dtype == "float16" else torch.float32
        images = torch.empty((self.config.batch_size, 3, height, width), dtype=dtype, device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(images_tl.as_tensor(), images, cuda_stream=stream)
        labels = np.asarray(labels_tl.as_tensor()).astype(np.int64).reshape(-1)
        keys = np.asarray(keys_tl.as_tensor()).astype(np.int64).reshape(-1)
        return FaceBatch(images=images, labels=torch.from_numpy(labels).to(device), num_valid=len(keys),
                         keys=torch.from_numpy(keys))

    # -- positions and checkpoints -----------------------------------------------------------
    def seek(self, epoch: int, epoch_samples: int) -> None:
        """Continue at ``epoch_samples`` global samples into ``epoch`` (a whole number of global
        batches): the same position at any world size and accumulation with this global batch."""
        if epoch_samples % self.global_batch_size:
            raise ValueError(f"{epoch_samples} samples into epoch {epoch} is not a whole number of global batches of "
                             f"{self.global_batch_size}: the checkpoint was written with another global batch")
        batch = epoch_samples // self.global_batch_size
        if not 0 <= batch <= self.schedule.batches_per_epoch:
            raise ValueError(f"global batch {batch} is outside an epoch of {self.schedule.batches_per_epoch}")
        self.epoch, self._batch = epoch, batch * self.micro_batches
        self._pipe = self._build((epoch * self.schedule.batches_per_epoch + batch) * self.micro_batches)

    def state_dict(self) -> dict[str, Any]:
        if self._batch % self.micro_batches:
            raise RuntimeError(f"the data position is in the middle of an optimizer step (micro-batch "
                               f"{self._batch % self.micro_batches} of {self.micro_batches}); save at step boundaries")
        return {"format": self.STATE_FORMAT, "epoch": self.epoch, "batch": self._batch // self.micro_batches,
                **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved global batch (any world size with the same global batch and seed)."""
        if state.get("format") == self.PREVIOUS_FORMAT:  # saved before the pointwise orders: same positions
            warnings.warn(f"the data position (epoch {state.get('epoch')}, batch {state.get('batch')}) was saved by an "
                          f"older fr_train ({self.PREVIOUS_FORMAT}) whose epoch order was another permutation: the rest "
                          "of this epoch visits a different subset of images than the saved run would have; later "
                          "epochs are complete as always", stacklevel=2)
        elif state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"not a {type(self).__name__} state (format {state.get('format')!r}, "
                             f"expected {self.STATE_FORMAT!r})")
        diff = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the {type(self).__name__} data position: {detail}")
        self.seek(int(state["epoch"]), int(state["batch"]) * self.global_batch_size)
