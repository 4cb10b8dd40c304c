"""Re-split head checkpoints written at W ranks for W′ ranks (pure function, no process group).

Every per-class tensor of a head state (``rows``: weight, bias, VPL memory and timestamps, and the
optimizer's ``rows``: momentum / Adam moments / per-row steps) is concatenated in class order and
cut again by the contiguous split rule of sharding.py. Global facts must agree across the input
states; sampler RNG streams cannot be split, so resharded states carry none and the head reseeds
deterministically from (seed, iteration, rank).
"""

from __future__ import annotations

from typing import Any

import torch

from fr_train.parallel.sharding import SPLIT_RULE, class_shard

_GLOBAL_FIELDS = ("format", "num_classes", "embedding_size", "split_rule", "world_size", "margin",
                  "sample_rate", "vpl", "seed", "iteration")


def _check_states(states: list[dict[str, Any]]) -> None:
    if not states:
        raise ValueError("reshard_head_states: no states given")
    first = states[0]
    if first.get("split_rule") != SPLIT_RULE:
        raise ValueError(f"reshard_head_states: field 'split_rule' is {first.get('split_rule')!r}, "
                         f"this code splits by {SPLIT_RULE!r}")
    if first["world_size"] != len(states):
        raise ValueError(f"reshard_head_states: field 'world_size' is {first['world_size']} but "
                         f"{len(states)} state(s) were given; pass one state per rank of the run")
    for r, s in enumerate(states):
        for field in _GLOBAL_FIELDS:
            if s.get(field) != first.get(field):
                raise ValueError(f"reshard_head_states: field {field!r} of rank {s.get('rank')} is "
                                 f"{s.get(field)!r}, rank {first.get('rank')} has {first.get(field)!r}")
        want = class_shard(first["num_classes"], first["world_size"], r)
        if (s["rank"], s["class_start"], s["num_local"]) != (r, want.class_start, want.num_local):
            raise ValueError(f"reshard_head_states: state #{r} has field 'rank'={s['rank']}, 'class_start'="
                             f"{s['class_start']}, 'num_local'={s['num_local']}; expected rank {r} owning "
                             f"[{want.class_start}, {want.class_end}); pass the states in rank order")
        if (s["optimizer"] is None) != (first["optimizer"] is None):
            raise ValueError("reshard_head_states: field 'optimizer' is present on some ranks only")


def _split(full: torch.Tensor, num_classes: int, new_world: int) -> list[torch.Tensor]:
    return [full[sh.class_start : sh.class_end].clone()
            for sh in (class_shard(num_classes, new_world, r) for r in range(new_world))]


def reshard_head_states(states: list[dict[str, Any]], new_world: int) -> list[dict[str, Any]]:
    """Head states of ranks ``0..W−1`` (in rank order) → states for ranks ``0..new_world−1``."""
    _check_states(states)
    if new_world < 1:
        raise ValueError(f"reshard_head_states: new_world must be >= 1, got {new_world}")
    first, num_classes = states[0], states[0]["num_classes"]
    same_world = new_world == len(states)
    row_parts = {name: _split(torch.cat([s["rows"][name] for s in states]), num_classes, new_world)
                 for name in first["rows"]}
    opt_parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    if first["optimizer"] is not None:
        for pname, entries in first["optimizer"]["rows"].items():
            opt_parts[pname] = {
                key: _split(torch.cat([s["optimizer"]["rows"][pname][key] for s in states]), num_classes, new_world)
                for key in entries
            }
    out = []
    for r in range(new_world):
        shard = class_shard(num_classes, new_world, r)
        state = {k: first[k] for k in _GLOBAL_FIELDS}
        state.update(world_size=new_world, rank=r, class_start=shard.class_start, num_local=shard.num_local)
        state["sampler_rng"] = states[r]["sampler_rng"] if same_world else None
        state["rows"] = {name: parts[r] for name, parts in row_parts.items()}
        if "replicated" in first:  # scalars every rank holds identically (e.g. BCE's/USS's bias b)
            state["replicated"] = first["replicated"]
        state["optimizer"] = None
        if first["optimizer"] is not None:
            state["optimizer"] = {
                "kind": first["optimizer"]["kind"],
                "hyper": dict(first["optimizer"]["hyper"]),
                "rows": {p: {k: parts[r] for k, parts in entries.items()} for p, entries in opt_parts.items()},
            }
        out.append(state)
    return out
