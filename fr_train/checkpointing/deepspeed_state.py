"""DeepSpeed's backbone-optimizer state in a form ``torch.load(weights_only=True)`` reads, and back.

Two layouts, told apart by the live optimizer's ``load_state_dict`` signature:

- replicated (ZeRO 0 in fp32 or fp16): one state, the same on every rank; rank 0 saves it.
- partitioned (ZeRO 1/2, DeepSpeed's bf16 optimizer): each rank holds a slice of the fp32 master
  weights and of the optimizer state. Every rank saves its own slice (an exact resume on the same
  world size); rank 0 also saves the state consolidated per parameter (gathered with DeepSpeed's
  ``safe_get_full_*``), which a run on another number of GPUs scatters into its own partitioning
  (``safe_set_full_*``): DeepSpeed's legacy ZeRO loader refuses a new data-parallel size.

DeepSpeed's state dicts carry the loss scaler as a Python object (and ZeRO's stage as an enum and
parameter-slice maps of named tuples): saved as plain numbers and restored into the live objects.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any

import torch

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


def _restore_scaler(optimizer: Any, fields: dict[str, Any] | None) -> None:
    """Write saved :func:`_scaler_fields` back into the live loss scaler (fp16), if both exist."""
    scaler = getattr(optimizer, "loss_scaler", None)
    for key, value in (fields or {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)


def _live_state(saved: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    state = dict(saved)
    if _SCALER in state:
        _restore_scaler(optimizer, state[_SCALER])
        state[_SCALER] = optimizer.loss_scaler
    if _ZERO_STAGE in state:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        state[_ZERO_STAGE] = ZeroStageEnum(state[_ZERO_STAGE])
    if hasattr(optimizer, "_param_slice_mappings"):
        state[_SLICE_MAPPINGS] = optimizer._param_slice_mappings
    return state


def consolidated_state(engine: Any) -> dict[str, Any] | None:
    """Per-parameter fp32 master weights and optimizer state of a partitioned optimizer, in the
    order of ``engine.module.parameters()``; a collective (call on every rank). None on a
    replicated optimizer. Rank-independent scalars of the base optimizer (Adam's step) and the loss
    scaler's state ride along."""
    if optimizer_layout(engine) != LAYOUT_PARTITIONED:
        return None
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = engine.optimizer.optimizer
    keys = sorted({k for st in base.state.values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
    scalars = {k: v for st in base.state.values() for k, v in st.items() if not (torch.is_tensor(v) and v.dim() > 0)}
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return {"fp32": [safe_get_full_fp32_param(p).cpu() for p in params],
            "state": {k: [safe_get_full_optimizer_state(p, k).cpu() for p in params] for k in keys},
            "scalars": scalars,
            _SCALER: _scaler_fields(engine.optimizer.loss_scaler) if hasattr(engine.optimizer, "loss_scaler") else None}


def load_consolidated_state(engine: Any, saved: dict[str, Any], where: str) -> None:
    """Scatter a :func:`consolidated_state` into this run's partitioning (any world size)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = [p for p in engine.module.parameters() if p.requires_grad]
    if len(saved["fp32"]) != len(params):
        raise ValueError(f"{where}: {len(saved['fp32'])} saved backbone parameters, the model has {len(params)}")
    base = engine.optimizer.optimizer
    # A fresh optimizer has no state yet (SGD makes its momentum at the first step): create the
    # partition buffers, then let DeepSpeed map each parameter's fragment onto them.
    for group in base.param_groups:
        for flat in group["params"]:
            for key in saved["state"]:
                base.state[flat].setdefault(key, torch.zeros_like(flat))
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(params):
        safe_set_full_fp32_param(p, saved["fp32"][i].to(p.device))
        for key, values in saved["state"].items():
            safe_set_full_optimizer_state(p, values[i].to(p.device), key)
    for st in base.state.values():
        st.update({k: v.clone() if torch.is_tensor(v) else v for k, v in saved["scalars"].items()})
    _restore_scaler(engine.optimizer, saved.get(_SCALER))


def load_optimizer_state(engine: Any, state: dict[str, Any]) -> None:
    """Load a :func:`portable_optimizer_state` of the same layout and world size: the whole state
    (replicated), or this rank's own slice (partitioned)."""
    optimizer = engine.optimizer
    live = _live_state(state, optimizer)
    if optimizer_layout(engine) == LAYOUT_PARTITIONED:
        # DeepSpeed's ZeRO loader takes every rank's state but, for a non-elastic checkpoint of the
        # same data-parallel size, reads only this rank's entry: each rank hands in its own.
        optimizer.load_state_dict([live] * engine.dp_world_size, load_optimizer_states=True,
                                  load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(live)


class BackboneWeights:
    """The backbone's parameters and buffers, replicated under ZeRO 0-2: one shared state."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        return self.engine.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.module.load_state_dict(state)


class BackboneOptimizer:
    """DeepSpeed's optimizer state in a checkpoint, in the layout the run uses.

    Replicated (ZeRO 0): the whole state, shared (key ``optimizer``). Partitioned (ZeRO 1/2, bf16):
    every rank its own slice (``backbone_optimizer``: exact, for the same world size) and the
    consolidated per-parameter state (``optimizer_consolidated``, a collective), which a resume on
    another world size scatters into its own partitioning. So a resume loads the slice when it has
    one (the re-split drops slices), else the consolidated state; :meth:`check_restored` then
    refuses a checkpoint that held neither."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.layout = optimizer_layout(engine)
        self.where = "checkpoint"  # the checkpoint being restored, for error messages
        self.restored = False

    def states(self) -> list[Any]:
        from fr_train.checkpointing.stateful import State

        return [State("backbone_optimizer", _OptimizerPart(self, "slice")),
                State("optimizer", _OptimizerPart(self, "whole"), shared=True),
                State("optimizer_consolidated", _OptimizerPart(self, "consolidated"), shared=True, collective=True)]

    def check_layout(self, saved_layout: str, where: str) -> None:
        self.where = where
        if saved_layout != self.layout:
            raise ValueError(f"{where}: the backbone optimizer state was saved {saved_layout}, this run's is "
                             f"{self.layout}: resume with the run.zero_stage (0 vs 1/2) and run.precision the "
                             "checkpoint was written with")

    def check_restored(self) -> None:
        if not self.restored:
            raise ValueError(f"{self.where}: holds no backbone optimizer state for this run's {self.layout} "
                             "optimizer; it was not written by a compatible fr_train: start a new run name")


class _OptimizerPart:
    """One of BackboneOptimizer's three checkpoint entries (``part``: slice, whole, consolidated)."""

    def __init__(self, owner: BackboneOptimizer, part: str) -> None:
        self.owner, self.part = owner, part

    def state_dict(self) -> dict[str, Any] | None:
        partitioned = self.owner.layout == LAYOUT_PARTITIONED
        if self.part == "consolidated":
            return consolidated_state(self.owner.engine)  # a collective under ZeRO, else None
        if (self.part == "slice") == partitioned:
            return portable_optimizer_state(self.owner.engine)
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.owner.restored:  # the slice came first: exact, the consolidated copy is not needed
            return
        if self.part == "consolidated":
            load_consolidated_state(self.owner.engine, state, self.owner.where)
        else:
            check_optimizer_format(self.owner.engine, state, self.owner.where)
            load_optimizer_state(self.owner.engine, state)
        self.owner.restored = True


def check_optimizer_format(engine: Any, state: dict[str, Any], where: str) -> None:
    """Refuse an optimizer state written by another kind of optimizer (its keys differ from the live
    one's): e.g. a bf16 checkpoint from before bf16 became autocast over a float32 engine (then
    DeepSpeed's FP16_UnfusedOptimizer: ``fp32_groups``, ``optimizer_state_dict``), whose state a
    plain SGD would misread or choke on deep inside DeepSpeed."""
    live = set(engine.optimizer.state_dict()) - {_SLICE_MAPPINGS}
    if set(state) != live:
        raise ValueError(f"{where}: the backbone optimizer state has fields {sorted(state)}, this run's optimizer "
                         f"({type(engine.optimizer).__name__}) has {sorted(live)}: the checkpoint was written with "
                         "another run.precision / run.zero_stage, or by an fr_train whose bf16 was DeepSpeed's bf16 "
                         "mode (before 2026-12-01); resume it with those settings and that version, or start a new "
                         "run name")
