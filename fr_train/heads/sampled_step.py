"""Steps 1–4 of PartialFC's forward, for heads that keep its sharding, sampling and optimizer but
replace the loss (BCE with a unified bias, UNPG): checks, normalise + all-gather, sample this
shard's rows, normalised prototypes. The loss-specific part is left to the caller.

This mirrors ``PartialFC.forward`` line for line (same sampler stream, same ``last_sampled_classes``);
a refactor of PartialFC exposing this as a method would remove the duplication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fr_train.heads.collectives import gather_rows, gather_rows_nograd
from fr_train.heads.partial_fc import PartialFC, _IndexRows


@dataclass(frozen=True)
class SampledStep:
    """``x``: [B, D] normalised global batch (gradient reduce-scattered to the owners); ``labels``: [B];
    ``w``: [S, D] normalised sampled prototypes of this shard (gradient to ``head.weight`` rows);
    ``target_col``: [B] column of each row's class in ``w``, −1 where another rank owns it;
    ``sizes``: local batch sizes; ``start``: first row of this rank in ``x``."""

    x: torch.Tensor
    labels: torch.Tensor
    w: torch.Tensor
    target_col: torch.Tensor
    sizes: list[int]
    start: int


def sampled_step(head: PartialFC, embeddings: torch.Tensor, labels: torch.Tensor) -> SampledStep:
    """Run PartialFC's shared front half (see module docstring); advances ``head.iteration`` in
    training mode and sets ``head.last_sampled_classes``."""
    if head.vpl is not None or head.margin.linear:
        raise ValueError(f"{type(head).__name__} needs a normalised margin and no VPL")
    sizes = head._check_and_sizes(embeddings, labels)
    dtype = torch.float64 if torch.float64 in (embeddings.dtype, head.weight.dtype) else torch.float32
    x = gather_rows(head.comm, F.normalize(embeddings.to(dtype), dim=1), sizes)
    y = gather_rows_nograd(head.comm, labels.to(torch.int64), sizes)
    if head.training:
        head.iteration += 1
    owned = torch.nonzero((y >= head.class_start) & (y < head.class_end)).squeeze(1)
    local_labels = y[owned] - head.class_start
    idx = head.sampler.sample(torch.unique(local_labels), head.iteration) if head.training else None
    if idx is None:
        w, cols = head.weight.to(dtype), local_labels
    else:
        w, cols = _IndexRows.apply(head.weight, idx).to(dtype), torch.searchsorted(idx, local_labels)
    target_col = torch.full_like(y, -1)
    target_col[owned] = cols
    sampled = torch.arange(head.num_local, device=y.device) if idx is None else idx
    head.last_sampled_classes = sampled + head.class_start
    return SampledStep(x=x, labels=y, w=F.normalize(w, dim=1), target_col=target_col, sizes=sizes,
                       start=sum(sizes[: head.comm.rank]))
