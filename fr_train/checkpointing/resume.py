"""What a resume needs beyond the bytes: the run facts (meta), the compatibility check, the code
version, and re-splitting per-rank payloads for another world size.

Per-rank payload convention (what ``CheckpointStates.collect`` builds from the Trainer's components,
checkpointing/stateful.py, and ``CheckpointManager.save_async`` writes):
``{"train": {"step", "epoch", "samples_seen", ...}, "head": PartialFC.state_dict(),
"data": iterator.state_dict() | None, "rng": capture_rng() | None, "backbone_optimizer": this rank's
ZeRO slice | None}`` (checkpointing/deepspeed_state.py). ``train`` holds GLOBAL facts
(identical on every rank; ``samples_seen`` counts samples of all ranks), so it survives any world
size. ``data`` (DALI's exact reader position) and ``rng`` (per-process streams) only mean something
for the same rank of the same world size: a reshard drops them (None), and the Trainer then starts
epoch ``train["epoch"]`` afresh and skips ahead by the global sample count (``samples_seen`` minus the
samples of completed epochs), and reseeds its RNGs from (seed, step, rank).
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fr_train.heads import reshard_head_states

META_FORMAT = "fr_train.checkpoint.meta/1"

COMPAT_FIELDS = ("backbone.name", "backbone.embedding_size", "head.margin", "head.vpl", "optimizer.name")
"""Config fields a checkpoint cannot be resumed across (besides the dataset's num_classes): they change
the shapes or the meaning of the saved tensors."""

RANK_PAYLOAD_KEYS = ("train", "head", "data", "rng", "backbone_optimizer")
TRAIN_KEYS = ("step", "epoch", "samples_seen")


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the installed package version."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=5, check=True)
        return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"fr_train {metadata.version('fr_train')}"
        except metadata.PackageNotFoundError:
            return "unknown (no git checkout, fr_train not installed)"


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def check_compatible(meta: dict[str, Any], config: dict[str, Any], num_classes: int) -> None:
    """Refuse to resume ``meta``'s checkpoint into a run with this ``config`` (``TrainConfig.to_dict()``)
    and dataset class count, naming the first field that differs."""
    where = meta.get("path", "checkpoint")
    if meta.get("num_classes") != num_classes:
        raise ValueError(f"{where}: field 'num_classes' is {meta.get('num_classes')!r}, this run's dataset has "
                         f"{num_classes}; resume only on the same dataset (or start a new run name)")
    saved = meta.get("config", {})
    for field in COMPAT_FIELDS:
        try:
            mine = _get(config, field)
        except KeyError:
            raise ValueError(f"run config has no field {field!r}: pass TrainConfig.to_dict()") from None
        try:
            theirs = _get(saved, field)
        except KeyError:
            raise ValueError(f"{where}: meta.json's config lacks field {field!r}: written by an incompatible "
                             "version of fr_train; start a new run name") from None
        if theirs != mine:
            raise ValueError(f"{where}: field {field!r} is {theirs!r} in the checkpoint, {mine!r} in this run; "
                             "a checkpoint resumes only the same model: restore the setting or use a new run name")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_rank_payload(payload: dict[str, Any], where: str) -> None:
    extra = sorted(set(payload) - set(RANK_PAYLOAD_KEYS))
    if extra:
        raise ValueError(f"{where}: unknown key(s) {extra}; a rank payload holds {list(RANK_PAYLOAD_KEYS)} "
                         "(put global state in the shared payload)")
    train = payload.get("train")
    if not isinstance(train, dict) or any(k not in train for k in TRAIN_KEYS):
        raise ValueError(f"{where}: key 'train' must be a dict with {list(TRAIN_KEYS)} (global counters)")


def reshard_rank_payloads(payloads: list[dict[str, Any]], new_world: int) -> list[dict[str, Any]]:
    """Rank payloads of a W-rank checkpoint (rank order) → payloads for ``new_world`` ranks.

    The head (rows, optimizer rows, VPL bank and timestamps) is re-split by the class-range rule
    (fr_train.heads.reshard_head_states); ``train`` must agree on all ranks and is copied; ``data``
    and ``rng`` are kept only when the world size is unchanged (module docstring).
    """
    if not payloads:
        raise ValueError("reshard_rank_payloads: no payloads given")
    for r, p in enumerate(payloads):
        check_rank_payload(p, f"rank {r} payload")
        if not _same(p["train"], payloads[0]["train"]):
            raise ValueError(f"reshard_rank_payloads: key 'train' of rank {r} is {p['train']}, rank 0 has "
                             f"{payloads[0]['train']}; the payloads are not from one checkpoint")
    same_world = new_world == len(payloads)
    has_head = [p.get("head") is not None for p in payloads]
    if any(has_head) and not all(has_head):
        raise ValueError(f"reshard_rank_payloads: key 'head' is missing on rank(s) "
                         f"{[r for r, h in enumerate(has_head) if not h]}")
    heads = reshard_head_states([p["head"] for p in payloads], new_world) if all(has_head) else None
    out = []
    for r in range(new_world):
        out.append({
            "train": dict(payloads[0]["train"]),
            "head": None if heads is None else heads[r],
            "data": payloads[r].get("data") if same_world else None,
            "rng": payloads[r].get("rng") if same_world else None,
            # a ZeRO slice fits only its own rank of the same world (another uses the consolidated state)
            "backbone_optimizer": payloads[r].get("backbone_optimizer") if same_world else None,
        })
    return out
