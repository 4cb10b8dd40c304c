"""What one rank's training loop carries between steps: its position, the time parts of a step,
and the protocol its data source meets (the DALI iterator, or an in-memory source in tests)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class StepTimes:
    """Wall-clock parts of one step, for the progress log and the metrics."""

    data: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.data + self.forward + self.backward + self.optimizer


class BatchSource(Protocol):
    """What the loop needs of its data: the DALI iterator, or an in-memory source in tests."""

    def __iter__(self) -> Iterator[Any]: ...  # items with .images [B,3,H,W] and .labels [B] int64
    def __len__(self) -> int: ...
    def reset(self) -> None: ...


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    epoch_samples: int = 0
    """Global samples consumed in the current epoch: the data position a resume on another world
    size (or from a source without a reader state) skips ahead to."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, int]:
        """The global counters (identical on every rank), the ``train`` entry of a checkpoint."""
        return {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                "epoch_samples": self.epoch_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.samples_seen = int(state["step"]), int(state["epoch"]), int(state["samples_seen"])
        self.epoch_samples = int(state.get("epoch_samples", 0))  # absent in checkpoints before elastic runs
