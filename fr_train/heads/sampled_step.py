"""PartialFC's shared front half for heads that keep its sharding, sampling and optimizer but
replace the loss (BCE with a unified bias, UNPG, USS, EPL): ``PartialFC.prepare``, restricted to
normalised margins without VPL."""

from __future__ import annotations

import torch

from fr_train.heads.margin import CombinedMargin
from fr_train.heads.partial_fc import PartialFC, SampledStep

__all__ = ["SampledStep", "check_seed_head", "sampled_step"]


def check_seed_head(name: str, margin: CombinedMargin, vpl: object, paper_margin: str) -> None:
    """The constructor checks every seed-method head shares: no VPL, a normalised margin."""
    if vpl is not None:
        raise ValueError(f"{name} does not support VPL")
    if margin.linear:
        raise ValueError(f"{name} needs a normalised margin ({paper_margin}), not CombinedMargin.softmax()")


def sampled_step(head: PartialFC, embeddings: torch.Tensor, labels: torch.Tensor) -> SampledStep:
    """``head.prepare`` (advances ``head.iteration`` in training mode, sets ``last_sampled_classes``)."""
    if head.vpl is not None or head.margin.linear:
        raise ValueError(f"{type(head).__name__} needs a normalised margin and no VPL")
    return head.prepare(embeddings, labels)
