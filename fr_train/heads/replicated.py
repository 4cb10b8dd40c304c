"""Replicated scalar parameters of a sharded head (BCE's and USS's unified bias b).

Such a parameter is the same on every rank: its gradient is the global one on every rank (the heads
all-reduce it in the forward), so every rank's optimizer applies the same update. It rides in the
head's row-sparse optimizer as a one-row parameter, but in checkpoints it is kept OUT of the
per-class ``rows`` that ``reshard_head_states`` re-splits by class, under ``state["replicated"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fr_train.heads.optim import RowSparseAdamW, RowSparseSGD

REPLICATED_KEY = "replicated"


def rebuild_with(opt: RowSparseSGD | RowSparseAdamW, named: list[tuple[str, nn.Parameter]],
                 state_dtype: torch.dtype | None) -> RowSparseSGD | RowSparseAdamW:
    """The same kind of optimizer with the same hyper-parameters over ``named`` parameters."""
    h = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    if opt.kind == "sgd":
        return RowSparseSGD(named, h["lr"], h["momentum"], h["weight_decay"], h["nesterov"], state_dtype)
    return RowSparseAdamW(named, h["lr"], h["betas"], h["eps"], h["weight_decay"], state_dtype)


def move_out(state: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
    """Move the replicated parameters (and their optimizer rows) of ``state`` under ``replicated``."""
    replicated: dict[str, Any] = {}
    for name, value in params.items():
        opt_rows = None
        if state.get("optimizer") is not None:
            opt_rows = state["optimizer"]["rows"].pop(name)
        replicated[name] = {"value": value.detach(), "optimizer": opt_rows}
    state[REPLICATED_KEY] = replicated


def move_in(state: dict[str, Any], names: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of :func:`move_out` on a shallow copy: (state for PartialFC.load_state_dict, values)."""
    replicated = state.get(REPLICATED_KEY)
    if replicated is None or any(n not in replicated for n in names):
        raise ValueError(f"head state: field {REPLICATED_KEY!r} must hold {names} (the unified bias); the state was "
                         "written by another head type, or resharded by a reshard_head_states that drops it")
    state = dict(state)
    if state.get("optimizer") is not None:
        rows = dict(state["optimizer"]["rows"])
        for n in names:
            if replicated[n]["optimizer"] is None:
                raise ValueError(f"head state: field '{REPLICATED_KEY}.{n}.optimizer' is missing while "
                                 "'optimizer' is set")
            rows[n] = replicated[n]["optimizer"]
        state["optimizer"] = {**state["optimizer"], "rows": rows}
    return state, {n: replicated[n]["value"] for n in names}
