"""The read side of checkpoints: the layout's names, loading and verifying one checkpoint
(``LoadedCheckpoint``), and surveying a run's checkpoints (which load, which do not and why). The
write side (``CheckpointManager``) is fr_train/checkpointing/manager.py; the layout is described
there."""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fr_train.checkpointing.files import (
    MANIFEST,
    CorruptCheckpointError,
    verify_directory,
)
from fr_train.checkpointing.resume import (
    META_FORMAT,
    check_compatible,
    reshard_rank_payloads,
)

log = logging.getLogger("fr_train.checkpoint")

RANK_FORMAT = "fr_train.checkpoint.rank/1"
SHARED_FORMAT = "fr_train.checkpoint.shared/1"
SHARED_FILE = "backbone.pt"
META_FILE = "meta.json"
META_REQUIRED = ("epoch", "samples_seen", "num_classes", "config")
STEP_DIR_PATTERN = re.compile(r"^step_(\d{9,})$")
TMP_DIR_PATTERN = re.compile(r"^\.tmp-step_(\d{9,})-")
SET_ASIDE_DIR = "set_aside"
"""Under the checkpoints directory: checkpoints no longer on the run's timeline (unloadable, or newer
than the step the run continued from), moved here by the commit that would otherwise collide with
them. fr_train never deletes or overwrites anything in it (``--overwrite`` aside, when the user asks)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def new_session_token() -> str:
    return uuid.uuid4().hex[:12]


def broadcast_session_token(group: Any = None) -> str:
    """Rank 0's fresh token on every rank (call once on the main thread, after init_process_group)."""
    import torch.distributed as dist

    box = [new_session_token() if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return str(box[0])


def _load(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # the manifest matched, so the bytes are what was written: say which file
        raise CorruptCheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint directory: its manifest, its meta, and lazy loaders of its files."""

    path: Path
    step: int
    meta: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    def check_compatible(self, config: dict[str, Any], num_classes: int) -> None:
        check_compatible({**self.meta, "path": str(self.path)}, config, num_classes)

    def rank_payload(self, rank: int, *, mmap: bool = False) -> dict[str, Any]:
        """The payload rank ``rank`` saved (same world size)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"{self.path}: rank {rank} is not in the saved world of {self.world_size} ranks")
        path = self.path / rank_file(rank)
        blob = _load(path, mmap=mmap)
        head = {k: blob.get(k) for k in ("format", "rank", "world_size", "step")}
        want = {"format": RANK_FORMAT, "rank": rank, "world_size": self.world_size, "step": self.step}
        for key, value in want.items():
            if head[key] != value:
                raise CorruptCheckpointError(f"{path}: field {key!r} is {head[key]!r}, expected {value!r}")
        return blob["payload"]

    def payload_for(self, rank: int, world: int) -> dict[str, Any]:
        """Rank ``rank``'s payload for a run of ``world`` ranks: the saved file when the world size is
        unchanged, else every saved rank's payload re-split (reshard_rank_payloads; memory-mapped)."""
        if world == self.world_size:
            return self.rank_payload(rank)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of size {world}")
        saved = [self.rank_payload(r, mmap=True) for r in range(self.world_size)]
        return reshard_rank_payloads(saved, world)[rank]

    def shared(self) -> dict[str, Any] | None:
        """Rank 0's shared payload (backbone + its optimizer), None when none was saved."""
        if SHARED_FILE not in self.manifest["files"]:
            return None
        path = self.path / SHARED_FILE
        blob = _load(path)
        if blob.get("format") != SHARED_FORMAT or blob.get("step") != self.step:
            raise CorruptCheckpointError(f"{path}: fields 'format'/'step' are {blob.get('format')!r}/"
                                         f"{blob.get('step')!r}, expected {SHARED_FORMAT!r}/{self.step}")
        return blob["payload"]


def load_checkpoint(path: str | Path, *, hash_files: bool = True) -> LoadedCheckpoint:
    """Verify ``path`` (a ``step_*`` directory) against its manifest; raises CorruptCheckpointError."""
    directory = Path(path)
    manifest = verify_directory(directory, hash_files=hash_files)
    meta_path = directory / META_FILE
    if META_FILE not in manifest["files"]:
        raise CorruptCheckpointError(f"{meta_path}: not listed in {MANIFEST}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != META_FORMAT:
        raise CorruptCheckpointError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {META_FORMAT!r}")
    for r in range(int(meta["world_size"])):
        if rank_file(r) not in manifest["files"]:
            raise CorruptCheckpointError(f"{directory / rank_file(r)}: missing from {MANIFEST} "
                                         f"(the run had {meta['world_size']} ranks)")
    return LoadedCheckpoint(directory, int(meta["step"]), meta, manifest)


def committed_steps(root: Path) -> list[tuple[int, Path]]:
    """``step_*`` directories under ``root`` (valid or not), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR_PATTERN.match(p.name))]
    return sorted(found, reverse=True)


@dataclass(frozen=True)
class Unloadable:
    """A ``step_*`` directory that cannot be loaded, and why (the file and the problem)."""

    step: int
    path: Path
    reason: str


@dataclass
class CheckpointSurvey:
    """What a resume finds under a checkpoints directory: the newest loadable checkpoint (None when
    there is none) and every newer one that could not be loaded, newest first. When none is loadable,
    ``unloadable`` lists them all: the reasons a refusal to start must give."""

    root: Path
    latest: LoadedCheckpoint | None
    unloadable: list[Unloadable]

    @property
    def found_any(self) -> bool:
        return self.latest is not None or bool(self.unloadable)


def survey_checkpoints(root: str | Path, *, hash_files: bool = True) -> CheckpointSurvey:
    """Verify the ``step_*`` directories under ``root`` newest first, up to the first loadable one.
    Reads only; nothing is moved or deleted. Why it stops there: verifying hashes every file (GBs
    for a large head), and older checkpoints play no part in a resume once a newer one loads."""
    root = Path(root)
    unloadable: list[Unloadable] = []
    for step, path in committed_steps(root):
        try:
            return CheckpointSurvey(root, load_checkpoint(path, hash_files=hash_files), unloadable)
        except (CorruptCheckpointError, OSError, ValueError, KeyError, TypeError) as e:
            unloadable.append(Unloadable(step, path, str(e)))
    return CheckpointSurvey(root, None, unloadable)


def log_survey(survey: CheckpointSurvey) -> None:
    """One warning per unloadable checkpoint, saying truthfully what the resume does instead: the
    older checkpoint it falls back to, or that none is loadable."""
    for bad in survey.unloadable:
        if survey.latest is not None:
            log.warning("checkpoint step %d skipped (cannot be loaded): %s; the newest loadable checkpoint is "
                        "the older step %d; %s is left in place until this run commits its next checkpoint, "
                        "then moved to %s (never deleted or overwritten by fr_train)", bad.step, bad.reason,
                        survey.latest.step, bad.path, survey.root / SET_ASIDE_DIR)
        else:
            log.warning("checkpoint step %d skipped (cannot be loaded): %s; no checkpoint under %s can be loaded",
                        bad.step, bad.reason, survey.root)


def find_latest(root: str | Path) -> LoadedCheckpoint | None:
    """The newest checkpoint under ``root`` whose manifest verifies. Every one skipped is logged with
    the file and the reason, so a fallback to an older step is never silent."""
    survey = survey_checkpoints(root)
    log_survey(survey)
    return survey.latest


def set_aside_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoints moved out of the way by earlier runs (``set_aside/*``, and ``abandoned_step_*``
    written by fr_train before issue 14), oldest first: kept for the user, who alone deletes them."""
    root = Path(root)
    found = list((root / SET_ASIDE_DIR).glob("step_*")) if (root / SET_ASIDE_DIR).is_dir() else []
    found += [p for p in root.glob("abandoned_step_*") if p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime)


