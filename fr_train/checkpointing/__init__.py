"""Sharded, atomic, verifiable, asynchronous and reshardable checkpoints (DESIGN.md, issue 5)."""

from __future__ import annotations

from fr_train.checkpointing.files import CorruptCheckpointError, verify_directory
from fr_train.checkpointing.loading import (
    CheckpointSurvey,
    LoadedCheckpoint,
    Unloadable,
    broadcast_session_token,
    find_latest,
    load_checkpoint,
    new_session_token,
    survey_checkpoints,
)
from fr_train.checkpointing.manager import CheckpointManager, SaveTiming
from fr_train.checkpointing.policy import SavePolicy
from fr_train.checkpointing.resume import check_compatible, code_version, reshard_rank_payloads
from fr_train.checkpointing.rng import capture_rng, restore_rng
from fr_train.checkpointing.rundir import (
    RunDirectoryError,
    RunStart,
    check_run_directory,
    claim_run_directory,
)
from fr_train.checkpointing.snapshot import snapshot

__all__ = [
    "CheckpointManager",
    "CheckpointSurvey",
    "CorruptCheckpointError",
    "LoadedCheckpoint",
    "RunDirectoryError",
    "RunStart",
    "SavePolicy",
    "SaveTiming",
    "Unloadable",
    "broadcast_session_token",
    "capture_rng",
    "check_compatible",
    "check_run_directory",
    "claim_run_directory",
    "code_version",
    "find_latest",
    "load_checkpoint",
    "new_session_token",
    "reshard_rank_payloads",
    "restore_rng",
    "snapshot",
    "survey_checkpoints",
    "verify_directory",
]
