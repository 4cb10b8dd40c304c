"""PartialFC's shared front half for heads that keep its sharding, sampling and optimizer but
replace the loss (BCE with a unified bias, UNPG, USS, EPL): ``PartialFC.prepare``, restricted to
normalised margins without VPL."""

from __future__ import annotations

from typing import Any

import torch

from fr_train.heads.margin import CombinedMargin
from fr_train.heads.partial_fc import PartialFC, SampledStep

__all__ = ["SampledStep", "check_seed_head", "load_with_memory_rows", "sampled_step"]


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


def load_with_memory_rows(head: PartialFC, state: dict[str, Any], names: tuple[str, ...], what: str,
                          strict: bool = True, assign: bool = False) -> None:
    """Load a seed head's state: PartialFC's own part, then the head's per-class memory rows
    (``names``: buffers of ``[num_local, ...]`` that PartialFC does not know), shape-checked, in place."""
    rows = dict(state["rows"])
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"head state: field 'rows' lacks {missing} ({what})")
    memory = {n: rows.pop(n) for n in names}
    PartialFC.load_state_dict(head, {**state, "rows": rows}, strict, assign)
    with torch.no_grad():
        for name, value in memory.items():
            target = getattr(head, name)
            if value.shape != target.shape:
                raise ValueError(f"head state: rows[{name!r}] has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(value)
