"""Variational prototype learning (Deng et al., CVPR 2021): inject recent features into prototypes.

Each class j keeps, on the rank that owns it, a memory ``M_j`` (the latest normalised feature of
class j, detached) and the iteration ``t_j`` it was written. At step t the prototype is
``W̃_j = normalize((1−λ)·normalize(W_j) + λ·M_j)`` if ``t > start_iter`` and ``t − t_j ≤ Δt``,
else ``normalize(W_j)`` (paper eq. 4–5; official code's ``queue``/``queue_iters``). A class never
written (``t_j = −1``) is never injected: its memory is only the random initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fr_train.heads.compact import write_rows

NEVER_WRITTEN = -1


@dataclass(frozen=True)
class VPLConfig:
    """λ (``lambda_``), Δt (``delta_t``) and ``start_iter`` default to the paper code's values."""

    lambda_: float = 0.15
    delta_t: int = 200
    start_iter: int = 8000

    def __post_init__(self) -> None:
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"VPLConfig.lambda_ must be in [0, 1], got {self.lambda_}")
        if self.delta_t < 0:
            raise ValueError(f"VPLConfig.delta_t must be >= 0, got {self.delta_t}")
        if self.start_iter < 0:
            raise ValueError(f"VPLConfig.start_iter must be >= 0, got {self.start_iter}")

    def to_dict(self) -> dict[str, float | int]:
        return {"lambda_": self.lambda_, "delta_t": self.delta_t, "start_iter": self.start_iter}


def fresh_rows(config: VPLConfig, memory_iter: torch.Tensor, step: int) -> torch.Tensor:
    """Rows whose memory is injected at `step`: written, and at most Δt steps old, after start_iter."""
    if step <= config.start_iter or config.lambda_ == 0.0:
        return torch.zeros_like(memory_iter, dtype=torch.bool)
    return (memory_iter != NEVER_WRITTEN) & (step - memory_iter <= config.delta_t)


def inject(
    config: VPLConfig,
    normalized_weight: torch.Tensor,
    memory: torch.Tensor,
    memory_iter: torch.Tensor,
    step: int,
) -> torch.Tensor:
    """Variational prototypes for the given rows (all tensors hold the same rows)."""
    if step <= config.start_iter or config.lambda_ == 0.0:
        return normalized_weight
    fresh = fresh_rows(config, memory_iter, step)
    # λ in the prototypes' dtype (a torch.where on Python scalars would round it to float32 first).
    lam = fresh.to(normalized_weight.dtype).mul_(config.lambda_).unsqueeze(1)
    mixed = (1.0 - lam) * normalized_weight + lam * memory.to(normalized_weight.dtype)
    return F.normalize(mixed, dim=1)


@torch.no_grad()
def write_latest(
    memory: torch.Tensor,
    memory_iter: torch.Tensor,
    local_labels: torch.Tensor,
    features: torch.Tensor,
    step: int,
    scale: torch.Tensor | None = None,
) -> None:
    """``M[y_i] ← x_i``, ``t[y_i] ← step`` for the given (owned) samples; for a class present several
    times the LAST sample in global batch order wins (deterministic on every device, unlike a plain
    indexed copy with duplicate indices). ``scale``: the per-row scales of a compact (fp8) bank, whose
    written rows are quantised (heads/compact.py)."""
    if local_labels.numel() == 0:
        return
    classes, inverse = torch.unique(local_labels, return_inverse=True)
    order = torch.arange(local_labels.numel(), device=local_labels.device)
    last = torch.full_like(classes, -1).scatter_reduce(0, inverse, order, reduce="amax")
    if scale is None:
        memory[classes] = features[last].to(memory.dtype)
    else:
        write_rows(memory, scale, classes, features[last])
    memory_iter[classes] = step
