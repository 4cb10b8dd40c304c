"""Sharded, atomic, verifiable, asynchronous and reshardable checkpoints (DESIGN.md, issue 5)."""

from __future__ import annotations

from fr_train.checkpointing.files import CorruptCheckpointError, verify_directory
from fr_train.checkpointing.manager import (
    CheckpointManager,
    LoadedCheckpoint,
    SaveTiming,
    broadcast_session_token,
    find_latest,
    load_checkpoint,
    new_session_token,
)
from fr_train.checkpointing.policy import SavePolicy
from fr_train.checkpointing.resume import check_compatible, code_version, reshard_rank_payloads
from fr_train.checkpointing.rng import capture_rng, restore_rng
from fr_train.checkpointing.snapshot import snapshot

__all__ = [
    "CheckpointManager",
    "CorruptCheckpointError",
    "LoadedCheckpoint",
    "SavePolicy",
    "SaveTiming",
    "broadcast_session_token",
    "capture_rng",
    "check_compatible",
    "code_version",
    "find_latest",
    "load_checkpoint",
    "new_session_token",
    "reshard_rank_payloads",
    "restore_rng",
    "snapshot",
    "verify_directory",
]
