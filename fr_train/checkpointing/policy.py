"""When to checkpoint: every N steps and/or every T minutes, at epoch ends, and when stopping.

The time condition differs between ranks (clocks, step skew), and every rank must save the same
step: the Trainer reduces ``due(...)`` with MAX over ranks (piggy-backed on its stop-flag all-reduce)
before calling ``save_async``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SavePolicy:
    every_steps: int = 0
    """0: no step trigger."""
    every_minutes: float = 0.0
    """0: no time trigger."""
    last_save_time: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0:
            raise ValueError(f"checkpoint.every_steps and every_minutes must be >= 0, got {self.every_steps}, "
                             f"{self.every_minutes}")

    def due(self, step: int, *, epoch_end: bool = False, stopping: bool = False, now: float | None = None) -> bool:
        """Whether this rank wants a checkpoint after ``step`` (``now``: time.monotonic())."""
        if epoch_end or stopping:
            return True
        if self.every_steps and step % self.every_steps == 0:
            return True
        now = time.monotonic() if now is None else now
        return bool(self.every_minutes) and now - self.last_save_time >= 60.0 * self.every_minutes

    def saved(self, now: float | None = None) -> None:
        self.last_save_time = time.monotonic() if now is None else now
