"""Learning-rate schedule: linear warmup, then polynomial decay to zero (insightface's default).

A pure function of the step, so a resumed run recomputes the exact rate from the step counter
and the schedule itself needs no saved state.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolySchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    def lr(self, step: int) -> float:
        """Rate for optimizer step `step` (0-based): warmup (step+1)/warmup, then
        (1 − (step − warmup)/(total − warmup))^power."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0:
            return self.base_lr
        progress = min(max(step - self.warmup_steps, 0), decay_steps) / decay_steps
        return self.base_lr * (1.0 - progress) ** self.power


def scaled_lr(lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule: `lr` was tuned for `base_batch` images per step (Goyal et al. 2017)."""
    return lr * global_batch / base_batch
