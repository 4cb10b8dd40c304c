"""Images per worker per micro-batch, and micro-batches per step, at a given world size.

A fixed-size run takes ``data.batch_size`` images per worker and ``run.grad_accum`` micro-batches per
step: the global batch is ``batch_size × W × grad_accum``, as it always was (a fixed-size run that
is resumed on another size gets another global batch, and says so).

An elastic run (``0 < run.min_workers < run.num_workers``) keeps the GLOBAL batch
``G = data.batch_size × run.num_workers × run.grad_accum`` whatever size Ray gives it, so that the
optimisation is the same function of the data at every size: the same images per step (the
samplers of data_pipeline/scheduled.py), the learning rate scaled by ``G``, the schedule counted in
steps. At ``W`` workers each takes ``G / W`` images per step, cut into the fewest micro-batches
that fit ``data.batch_size`` (so a worker never holds more activations than at the full size):
``micro = G / (W·a)`` for the smallest ``a ≥ 1`` that divides ``G / W`` with ``G / (W·a) ≤
data.batch_size``. At ``W = num_workers`` that is exactly ``(batch_size, grad_accum)``. This needs
``W | G`` for every ``W`` in ``[min_workers, num_workers]``: a range that breaks it is refused at
launch (``check_elastic_range``) with the global batches that would work.

What is then exactly the same step at every size: per-sample losses (softmax family, margins, BCE)
with the full prototype set (``head.sample_rate=1``) and BatchNorm on running statistics
(``backbone.freeze_bn``), up to float summation order. What is not: batch-statistics BatchNorm
(per-worker statistics), negative class sampling (each rank samples its own shard), pair losses
and in-batch negatives (computed per global micro-batch), and the heads' iteration counters
(VPL/EPL/USS count forward passes, so their schedules stretch by the accumulation factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fr_train.config import RunSettings, TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    """Images per worker per forward pass (the data pipeline's batch size)."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world * self.grad_accum


def is_elastic(run: RunSettings) -> bool:
    return 0 < run.min_workers < run.num_workers


def split_global_batch(global_batch: int, world: int, max_micro_batch: int) -> BatchPlan:
    """The plan of ``global_batch`` images over ``world`` workers with micro-batches of at most
    ``max_micro_batch`` images and the fewest micro-batches (module docstring)."""
    if world < 1 or max_micro_batch < 1:
        raise ValueError(f"world ({world}) and the largest micro-batch ({max_micro_batch}) must be >= 1")
    if global_batch % world:
        raise ValueError(f"the global batch {global_batch} does not split evenly over {world} workers")
    per_worker = global_batch // world
    accum = next(a for a in range(1, per_worker + 1) if per_worker % a == 0 and per_worker // a <= max_micro_batch)
    return BatchPlan(micro_batch=per_worker // accum, grad_accum=accum, world=world)


def plan_batches(cfg: TrainConfig, world: int) -> BatchPlan:
    """This run's plan at ``world`` workers (fixed size: the configured one; elastic: module docstring)."""
    if not is_elastic(cfg.run):
        return BatchPlan(micro_batch=cfg.data.batch_size, grad_accum=cfg.run.grad_accum, world=world)
    if not cfg.run.min_workers <= world <= cfg.run.num_workers:
        raise ValueError(f"an elastic run of {cfg.run.min_workers} to {cfg.run.num_workers} workers was started "
                         f"on {world}")
    return split_global_batch(elastic_global_batch(cfg), world, cfg.data.batch_size)


def elastic_global_batch(cfg: TrainConfig) -> int:
    return cfg.data.batch_size * cfg.run.num_workers * cfg.run.grad_accum


def check_elastic_range(cfg: TrainConfig) -> None:
    """Refuse an elastic range whose global batch does not split over every size in it, naming the
    sizes that fail and global batches that work (raised at launch, before any worker starts)."""
    if not is_elastic(cfg.run):
        return
    g, lo, hi = elastic_global_batch(cfg), cfg.run.min_workers, cfg.run.num_workers
    bad = [w for w in range(lo, hi + 1) if g % w]
    if not bad:
        return
    lcm = math.lcm(*range(lo, hi + 1))
    fits = [n * lcm for n in range(max(1, g // lcm), g // lcm + 2)]
    raise ValueError(f"elastic run of {lo} to {hi} workers: the global batch {g} (data.batch_size "
                     f"{cfg.data.batch_size} × run.num_workers {hi} × run.grad_accum {cfg.run.grad_accum}) does not "
                     f"split evenly over {', '.join(map(str, bad))} worker(s); it must be a multiple of {lcm} "
                     f"(e.g. {' or '.join(map(str, fits))}): change data.batch_size or narrow --min-workers")


def empty_epoch_error(plan: BatchPlan, num_images: int, data_dir: object) -> ValueError | None:
    """The error of a plan whose epoch would hold no step (each rank reads ``floor(N/W)`` images in
    ``micro_batch`` batches, ``grad_accum`` to a step: DaliConfig's ``last_batch="drop"``), or None.
    One message for the driver's early check (before Ray starts) and the Trainer's exact one."""
    if num_images // plan.world // plan.micro_batch // plan.grad_accum > 0:
        return None
    return ValueError(
        f"{plan.micro_batch} images × {plan.world} ranks × {plan.grad_accum} micro-batches (data.batch_size, "
        f"run.grad_accum) is larger than the dataset {data_dir} ({num_images} images): lower data.batch_size or "
        "run.grad_accum")

