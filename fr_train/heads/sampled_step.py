"""PartialFC's shared front half for heads that keep its sharding, sampling and optimizer but
replace the loss (BCE with a unified bias, UNPG, USS, EPL): ``PartialFC.prepare``, restricted to
normalised margins without VPL."""

from __future__ import annotations

import torch

from fr_train.heads.partial_fc import PartialFC, SampledStep

__all__ = ["SampledStep", "sampled_step"]


def sampled_step(head: PartialFC, embeddings: torch.Tensor, labels: torch.Tensor) -> SampledStep:
    """``head.prepare`` (advances ``head.iteration`` in training mode, sets ``last_sampled_classes``)."""
    if head.vpl is not None or head.margin.linear:
        raise ValueError(f"{type(head).__name__} needs a normalised margin and no VPL")
    return head.prepare(embeddings, labels)
