"""Collectives of the sharded head: uneven all-gather whose backward sums each rank's slice back to
it, plus the small helpers the distributed cross-entropy needs. All are no-ops at world size 1.

Uneven local batches (the short last batch of an epoch) are handled by padding every rank's rows
to the largest local batch, gathering, and trimming; the sizes are exchanged first
(:func:`exchange_meta`) together with the validation flags, so a bad input makes every rank raise
the same error instead of one rank leaving the others stuck in a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fr_train.parallel.sharding import Comm

# torch >= 2.8 renamed the tensor-in/tensor-out collectives; keep working on torch >= 2.4.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def exchange_meta(comm: Comm, meta: torch.Tensor) -> torch.Tensor:
    """All-gather a small int64 vector from every rank → ``[world, len(meta)]``."""
    if not comm.distributed:
        return meta.view(1, -1)
    out = torch.empty(comm.world_size * meta.numel(), dtype=meta.dtype, device=meta.device)
    _all_gather_tensor(out, meta.contiguous(), group=comm.group)
    return out.view(comm.world_size, -1)


def _gather_padded(comm: Comm, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    pad_to = max(sizes)
    padded = x.new_zeros((pad_to, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((comm.world_size * pad_to, *x.shape[1:]))
    _all_gather_tensor(out, padded, group=comm.group)
    out = out.view(comm.world_size, pad_to, *x.shape[1:])
    return torch.cat([out[r, : sizes[r]] for r in range(comm.world_size)])


def gather_rows_nograd(comm: Comm, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (no gradient), ``sizes[r]`` rows from rank r."""
    if not comm.distributed:
        return x
    return _gather_padded(comm, x, sizes)


class _GatherRows(torch.autograd.Function):
    """Forward: all ranks' rows, concatenated in rank order. Backward: every rank holds a partial
    gradient for ALL gathered rows (its shard's contribution); the true gradient of a rank's own
    rows is the sum of those partials over ranks — a reduce-scatter (each contribution counted once).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.sizes = comm, sizes
        return _gather_padded(comm, x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        comm, sizes = ctx.comm, ctx.sizes
        rank, pad_to = comm.rank, max(sizes)
        padded = grad.new_zeros((comm.world_size, pad_to, *grad.shape[1:]))
        offset = 0
        for r, n in enumerate(sizes):
            padded[r, :n] = grad[offset : offset + n]
            offset += n
        out = grad.new_empty((pad_to, *grad.shape[1:]))
        _reduce_scatter_tensor(out, padded.view(comm.world_size * pad_to, *grad.shape[1:]), group=comm.group)
        return out[: sizes[rank]], None, None


def gather_rows(comm: Comm, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Autograd-aware uneven all-gather of rows (see :class:`_GatherRows`)."""
    if not comm.distributed:
        return x
    return _GatherRows.apply(x, comm, sizes)


def all_reduce_(comm: Comm, t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if comm.distributed:
        dist.all_reduce(t, op=op, group=comm.group)
    return t


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_backbone_grad(embeddings: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient flowing back into the backbone by ``factor``.

    The head's loss is the GLOBAL batch mean, identical on every rank, and rank r receives exactly
    ``dL/d(its embeddings)``. The backbone's true gradient is therefore the SUM over ranks of the
    per-rank backbone gradients; a data-parallel engine that AVERAGES gradients (DeepSpeed, DDP)
    delivers ``1/W`` of it. Feed the head ``scale_backbone_grad(emb, W)`` to undo that average
    without touching the head's own (model-parallel, never averaged) gradients.
    """
    if factor == 1.0:
        return embeddings
    return _ScaleGrad.apply(embeddings, float(factor))
