"""DeepSpeed's backbone-optimizer state in a form ``torch.load(weights_only=True)`` reads, and back.

Two layouts, told apart by the live optimizer's ``load_state_dict`` signature:

- replicated (ZeRO 0 in fp32 or fp16): one state, the same on every rank; rank 0 saves it.
- partitioned (ZeRO 1/2, DeepSpeed's bf16 optimizer): each rank holds a slice of the fp32 master
  weights and of the optimizer state; every rank saves its own, and loading hands ALL saved slices
  to DeepSpeed's elastic loader (``zero_optimization.elastic_checkpoint``), which re-partitions them
  for the current data-parallel size, so a run resumes on another number of GPUs.

DeepSpeed's state dicts carry the loss scaler as a Python object (and ZeRO's stage as an enum and
parameter-slice maps of named tuples): saved as plain numbers and restored into the live objects.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any

LAYOUT_REPLICATED = "replicated"
LAYOUT_PARTITIONED = "partitioned"

_SCALER = "loss_scaler"
_SLICE_MAPPINGS = "param_slice_mappings"  # rebuilt from the live model: only universal checkpoints use it
_ZERO_STAGE = "zero_stage"


def optimizer_layout(engine: Any) -> str:
    """``partitioned`` when the live optimizer loads a list of per-rank states (ZeRO 1/2, bf16)."""
    params = inspect.signature(engine.optimizer.load_state_dict).parameters
    return LAYOUT_PARTITIONED if "state_dict_list" in params else LAYOUT_REPLICATED


def _scaler_fields(scaler: Any) -> dict[str, Any]:
    """The loss scaler's state: its numeric attributes (current scale, iteration, last overflow,
    hysteresis), never the object."""
    import torch

    return {k: v for k, v in vars(scaler).items()
            if isinstance(v, bool | int | float | type(None) | torch.Tensor)}


def portable_optimizer_state(engine: Any) -> dict[str, Any]:
    """``engine.optimizer.state_dict()`` with DeepSpeed's objects replaced by plain values."""
    out: dict[str, Any] = {}
    for key, value in engine.optimizer.state_dict().items():
        if key == _SCALER:
            out[key] = _scaler_fields(value)
        elif key == _SLICE_MAPPINGS:
            continue
        elif isinstance(value, enum.Enum):
            out[key] = value.value
        else:
            out[key] = value
    return out


def _live_state(saved: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    state = dict(saved)
    if _SCALER in state:
        scaler = optimizer.loss_scaler
        for key, value in state[_SCALER].items():
            if hasattr(scaler, key):
                setattr(scaler, key, value)
        state[_SCALER] = scaler
    if _ZERO_STAGE in state:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        state[_ZERO_STAGE] = ZeroStageEnum(state[_ZERO_STAGE])
    if hasattr(optimizer, "_param_slice_mappings"):
        state[_SLICE_MAPPINGS] = optimizer._param_slice_mappings
    return state


def load_optimizer_state(engine: Any, states: list[dict[str, Any]], where: str) -> None:
    """Load saved states into ``engine.optimizer``: one state (replicated), or every saved rank's
    slice in rank order (partitioned; any number of saved ranks)."""
    optimizer = engine.optimizer
    live = [_live_state(s, optimizer) for s in states]
    if optimizer_layout(engine) == LAYOUT_PARTITIONED:
        optimizer.load_state_dict(live, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        if len(live) != 1:
            raise ValueError(f"{where}: {len(live)} backbone optimizer states for a replicated optimizer")
        optimizer.load_state_dict(live[0])
