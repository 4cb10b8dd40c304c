"""How classes are split over ranks, and which process group the head talks to.

Contiguous blocks (DESIGN.md): with C classes and W ranks, rank r owns
``num_local = C // W + (r < C % W)`` classes starting at ``class_start = r*(C // W) + min(r, C % W)``.
A checkpoint records C and this rule so it can be re-split for another W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

SPLIT_RULE = "contiguous: num_local = C // W + (r < C % W); class_start = r*(C // W) + min(r, C % W)"


@dataclass(frozen=True)
class ClassShard:
    """The block of classes one rank owns."""

    num_classes: int
    world_size: int
    rank: int
    class_start: int
    num_local: int

    @property
    def class_end(self) -> int:
        return self.class_start + self.num_local


def class_shard(num_classes: int, world_size: int, rank: int) -> ClassShard:
    """The contiguous block of ``rank`` among ``world_size`` ranks for ``num_classes`` classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(num_classes, world_size)
    return ClassShard(
        num_classes=num_classes,
        world_size=world_size,
        rank=rank,
        class_start=rank * base + min(rank, extra),
        num_local=base + (rank < extra),
    )


@dataclass(frozen=True)
class Comm:
    """The process group of the head; ``group is None and world_size == 1`` means no torch.distributed."""

    group: dist.ProcessGroup | None
    world_size: int
    rank: int
    backend: str

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_group(group: dist.ProcessGroup | None) -> Comm:
    """``group=None``: the default group when torch.distributed is initialised, else a world of one."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return Comm(group=None, world_size=1, rank=0, backend="none")
    return Comm(
        group=group,
        world_size=dist.get_world_size(group),
        rank=dist.get_rank(group),
        backend=str(dist.get_backend(group)),
    )


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A private host copy of ``t`` for a checkpoint. A CUDA tensor goes straight to host memory: a
    ``clone()`` first would briefly double the shard on the device (40 GB at 10M classes with
    momentum), the difference between saving and running out of memory."""
    return t.detach().to("cpu", copy=True)


def host_copies(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples, leaves) with every tensor replaced by its :func:`host_copy`:
    a head's ``state_dict()`` is the private copy of its ``live_state()``."""
    if isinstance(tree, torch.Tensor):
        return host_copy(tree)
    if isinstance(tree, dict):
        return {k: host_copies(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(host_copies(v) for v in tree)
    return tree
