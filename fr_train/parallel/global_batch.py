"""The global batch every sample-to-sample loss works on, and the one reduction they all share.

Each rank holds a slice of the batch. The pair losses (triplet, contrastive, UNPG's in-batch
negatives) compare every sample with every other sample of the GLOBAL batch, so each rank
all-gathers the L2-normalised embeddings with the autograd-aware uneven gather of the head
(``fr_train.parallel.collectives.gather_rows``: its backward sums every rank's partial gradient of a
row back to the row's owner) and the labels without gradient.

Work is split by anchor: rank r computes the loss terms of ITS OWN rows against all gathered rows,
and :func:`sum_over_ranks` adds the ranks' partial sums. Its value is the all-reduced total (the same
on every rank) while its gradient is only the local term's, so the gather's reduce-scatter counts
every term exactly once and rank r ends up with exactly ``dL/d(its embeddings)`` for the global
loss ``L`` — the gradient contract of the sharded head (fr_train/heads/partial_fc.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fr_train.parallel.collectives import all_reduce_, exchange_meta, gather_rows, gather_rows_nograd
from fr_train.parallel.sharding import Comm


@dataclass(frozen=True)
class GlobalBatch:
    """``x``: [B, D] normalised embeddings of all ranks in rank order (gradient flows back to the
    owners); ``labels``: [B]; ``start``/``stop``: this rank's rows in ``x``; ``sizes``: local sizes."""

    x: torch.Tensor
    labels: torch.Tensor
    start: int
    stop: int
    sizes: list[int]

    @property
    def local(self) -> slice:
        return slice(self.start, self.stop)


def check_and_sizes(comm: Comm, embeddings: torch.Tensor, labels: torch.Tensor, who: str) -> list[int]:
    """Exchange local batch sizes and input checks; every rank raises the same error on bad input
    (a rank raising alone would leave the others stuck in the next collective)."""
    shape_ok = embeddings.dim() == 2 and embeddings.shape[0] == (labels.shape[0] if labels.dim() == 1 else -1)
    labels_ok = labels.dim() == 1 and not labels.is_floating_point() and not labels.is_complex() \
        and labels.dtype != torch.bool
    negative = int((labels < 0).sum()) if labels_ok and labels.numel() else 0
    nonfinite = int((~torch.isfinite(embeddings)).any(dim=1).sum()) if shape_ok and embeddings.numel() else 0
    n = embeddings.shape[0] if embeddings.dim() >= 1 else 0
    dim = embeddings.shape[-1] if embeddings.dim() >= 1 else -1
    meta = torch.tensor([n, int(shape_ok), int(labels_ok), negative, nonfinite, dim],
                        dtype=torch.int64, device=embeddings.device)
    table = exchange_meta(comm, meta).tolist()
    problems = []
    dims = {row[5] for row in table if row[0] > 0}
    if len(dims) > 1:
        problems.append(f"embedding sizes differ between ranks: {[row[5] for row in table]}")
    for r, (rn, rshape, rlab, rneg, rnonfinite, _) in enumerate(table):
        if not rshape:
            problems.append(f"rank {r}: embeddings must be [batch, dim] with one label per row ({rn} rows)")
        if not rlab:
            problems.append(f"rank {r}: labels must be a 1-d integer tensor")
        if rneg:
            problems.append(f"rank {r}: {rneg} negative label(s); class ids start at 0")
        if rnonfinite:
            problems.append(f"rank {r}: {rnonfinite} embedding row(s) contain NaN or inf; the backbone diverged "
                            "(lower the LR, check the loss scale) or the input batch is corrupt")
    if problems:
        raise ValueError(f"{who}: bad input:\n  " + "\n  ".join(problems))
    sizes = [row[0] for row in table]
    if sum(sizes) == 0:
        raise ValueError(f"{who}: the global batch is empty on every rank")
    return sizes


def gather_global_batch(comm: Comm, embeddings: torch.Tensor, labels: torch.Tensor, who: str) -> GlobalBatch:
    """Check, L2-normalise (in float64 if the input is float64, else float32) and all-gather."""
    sizes = check_and_sizes(comm, embeddings, labels, who)
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x_local = F.normalize(embeddings.to(dtype), dim=1)
    x = gather_rows(comm, x_local, sizes)
    y = gather_rows_nograd(comm, labels.to(torch.int64), sizes)
    start = sum(sizes[: comm.rank])
    return GlobalBatch(x=x, labels=y, start=start, stop=start + sizes[comm.rank], sizes=sizes)


def sum_over_ranks(comm: Comm, local: torch.Tensor) -> torch.Tensor:
    """Value ``Σ_r local_r`` (all-reduced, identical on every rank); gradient: ``local``'s own.

    ``total + (local − local.detach())``: the added term is exactly 0 in value (so every rank returns
    the same bits) and carries the local graph.
    Correct only when every term of the total is computed on exactly one rank and reaches shared
    inputs through :func:`gather_rows` (whose backward sums the ranks' partial gradients)."""
    total = local.detach().clone()
    all_reduce_(comm, total, dist.ReduceOp.SUM)
    return total + (local - local.detach())


def count_over_ranks(comm: Comm, count: torch.Tensor) -> torch.Tensor:
    """All-reduced sum of a (non-differentiable) count, e.g. the number of valid anchors."""
    total = count.detach().clone()
    return all_reduce_(comm, total, dist.ReduceOp.SUM)
