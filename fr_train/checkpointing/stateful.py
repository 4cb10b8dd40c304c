"""What a checkpoint is made of: a list of components, each saving and restoring its own state.

A Trainer hands the CheckpointManager this list once (``CheckpointManager(states=...)``, after
torchtitan's ``CheckpointManager(states=...)``) instead of assembling and taking apart every
component's state by hand at each save and resume. Each entry names its key in the checkpoint and
where its state lives:

- per rank (the default): every rank saves its own (the head's shard, the data reader's position,
  the RNG streams, a ZeRO slice); on another world size a re-split gives each new rank its part
  (``resume.reshard_rank_payloads``), and state that only means something for the same rank of
  the same world (reader position, RNG, ZeRO slice) comes back as None;
- shared: a replicated component (the backbone, its replicated optimizer, the distillation
  thresholds) that rank 0 saves once and every rank loads.

``state_dict`` of a shared entry runs on rank 0 only, unless the entry is ``collective`` (its
``state_dict`` is a collective every rank must join, e.g. gathering a partitioned optimizer).
A component whose state the checkpoint lacks (None) is left as built and reported to the caller,
which knows the fallback (skip ahead in the data, reseed the RNGs).

The key sets are resume.py's RANK_PAYLOAD_KEYS (per rank) and the shared payload's keys: the file
format is unchanged by this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class LiveStateful(Protocol):
    """A component whose ``state_dict()`` is a private host copy (the heads) and which also offers
    the same state over its live tensors, for a caller that copies them itself."""

    def live_state(self) -> Any: ...


def _state_of(component: Stateful, copy: bool) -> Any:
    if not copy and isinstance(component, LiveStateful):
        return component.live_state()
    return component.state_dict()


@dataclass(frozen=True)
class State:
    """One component of a checkpoint."""

    key: str
    component: Stateful
    shared: bool = False
    """Saved once by rank 0 (a replicated component), loaded by every rank."""
    collective: bool = False
    """Its state_dict is a collective: every rank calls it, rank 0 keeps the result."""


@dataclass(frozen=True)
class CheckpointStates:
    """The components a run checkpoints, in the order they are saved and restored."""

    states: tuple[State, ...]

    def __post_init__(self) -> None:
        keys = [s.key for s in self.states]
        if len(set(keys)) != len(keys):
            raise ValueError(f"checkpoint states: duplicate keys in {keys}")

    def collect(self, rank: int, *, copy: bool = True,
                collectives: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(this rank's payload, the shared payload on rank 0 else None). ``collectives=False`` leaves
        out the collective entries (their keys are then absent): a partial state, for sizing buffers.

        ``copy=False``: components whose ``state_dict`` is a private host copy (the heads) hand back
        their ``live_state()`` instead: only for a caller that copies every tensor of the result
        before the next training step (CheckpointManager's staging buffers). Other components'
        states are what their state_dict returns either way (``module.state_dict()``: the live
        parameters)."""
        payload: dict[str, Any] = {}
        shared: dict[str, Any] = {}
        for s in self.states:
            if s.collective and not collectives:
                continue
            if not s.shared:
                payload[s.key] = _state_of(s.component, copy)
            elif rank == 0 or s.collective:
                state = _state_of(s.component, copy)
                if rank == 0:
                    shared[s.key] = state
        return payload, shared if rank == 0 else None

    def restore(self, payload: dict[str, Any], shared: dict[str, Any]) -> list[str]:
        """Load every component whose state the checkpoint holds; return the keys it lacks."""
        missing = []
        for s in self.states:
            state = (shared if s.shared else payload).get(s.key)
            if state is None:
                missing.append(s.key)
            else:
                s.component.load_state_dict(state)
        return missing
