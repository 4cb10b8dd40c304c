"""A run name owns its directory: what a start may do with STORAGE/NAME (issue 14).

A run directory holds one run: ``checkpoints/`` (``step_*``, ``set_aside/``), ``final/``,
``train_log.jsonl`` and ``config.json``. Two defects lost whole runs silently: ``--resume auto`` with
every checkpoint damaged started over from step 0 on top of them, and a second run of the same name
with ``--resume never`` replaced the first run's model and checkpoints. The rules now:

* ``auto`` continues from the newest loadable checkpoint. If the directory holds checkpoints and none
  can be loaded, or holds ``final/`` with no checkpoint to continue from, it refuses to start, with one
  line per checkpoint and why, and what to pass instead. Nothing is moved or deleted.
* ``never`` (a new run) refuses a directory that holds checkpoints or ``final/`` unless
  ``run.overwrite`` (``--overwrite``) is set; then those are deleted at the start, after the log
  lists them, because the user asked for exactly that.
* a checkpoint path continues from that checkpoint.
* A restart of the same launch (Ray Train restarting its workers after a failure, recognised by the
  launch id recorded in ``LAUNCH_FILE``) continues from the newest loadable checkpoint whatever the
  original mode: restarting a ``never`` or ``--overwrite`` launch must not throw away (or delete) the
  progress that launch itself made.

``check_run_directory`` decides and raises ``RunDirectoryError``; it reads only, so the launcher can
call it on the driver before any worker starts. ``claim_run_directory`` (rank 0 of the Trainer,
after the check) does the deletion ``--overwrite`` asked for and records the launch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fr_train.checkpointing.files import verify_directory
from fr_train.checkpointing.loading import (
    CheckpointSurvey,
    LoadedCheckpoint,
    committed_steps,
    log_survey,
    set_aside_checkpoints,
    survey_checkpoints,
)

if TYPE_CHECKING:
    from fr_train.config import TrainConfig

log = logging.getLogger("fr_train.checkpoint")

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
LAUNCH_FILE = "fr_train_launch.json"
"""The id of the launch that last started the run (Ray cluster session + job id): a start carrying the
same id is a restart of that launch, not a new run."""
RUN_FILES = ("train_log.jsonl", "config.json", LAUNCH_FILE, "tensorboard")
"""Files of a run that ``--overwrite`` deletes along with checkpoints/ and final/ (the log and the
TensorBoard curves of the replaced run would otherwise interleave with the new one's)."""

_CONTINUE = "--resume auto (checkpoint.resume=auto) to continue it"
_OVERWRITE = ("--resume never --overwrite (checkpoint.resume=never, run.overwrite=true) to delete it and start a "
              "new run in its place")
_NEW_NAME = "another --name (run.name) to keep it and start a new run beside it"


class RunDirectoryError(ValueError):
    """The run directory cannot be used the way this start asks; the message names the directory,
    what it holds and the options. Not retryable: the same start fails the same way until the user
    changes the command (or repairs the directory), so a launcher should not restart it."""


@dataclass
class RunStart:
    """What a start does with its run directory (``check_run_directory``'s decision)."""

    run_dir: Path
    resume: str
    """What this start does: "auto" (continue ``resume_from``, or start fresh when it is None),
    "never" (start fresh) or a checkpoint directory to continue from."""
    resume_from: LoadedCheckpoint | None = None
    """auto: the newest loadable checkpoint, verified (every file hashed) by the check."""
    restart: bool = False
    """The same launch, restarted: continues its own progress and replaces nothing."""
    survey: CheckpointSurvey | None = None
    replace: list[Path] = field(default_factory=list)
    """What --overwrite deletes (``claim_run_directory``), with a description each in the log."""
    set_aside: list[Path] = field(default_factory=list)

    @property
    def resume_path(self) -> str | None:
        """The checkpoint directory this start continues from, None for a fresh start."""
        if self.resume == "auto":
            return None if self.resume_from is None else str(self.resume_from.path)
        return None if self.resume == "never" else self.resume

    def to_json(self) -> dict[str, Any]:
        """For the run's log: what the start found and did."""
        return {"resume": self.resume, "restart": self.restart,
                "resumed_from": None if self.resume_from is None else str(self.resume_from.path),
                "unloadable": [] if self.survey is None else [{"path": str(u.path), "reason": u.reason}
                                                              for u in self.survey.unloadable],
                "replaced": [str(p) for p in self.replace]}


def recorded_launch(run_dir: str | Path) -> str | None:
    """The launch id ``claim_run_directory`` recorded, None without one (or an unreadable file)."""
    try:
        value = json.loads((Path(run_dir) / LAUNCH_FILE).read_text()).get("launch")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _steps_text(paths: list[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]} … {names[-1]}"


def _holdings(run_dir: Path) -> list[str]:
    """What of a run the directory holds, one phrase each (empty: nothing a new run could destroy)."""
    root = run_dir / CHECKPOINTS_DIR
    held = []
    steps = [p for _, p in committed_steps(root)]
    if steps:
        held.append(f"{len(steps)} checkpoint(s) in {root} ({_steps_text(steps)})")
    aside = set_aside_checkpoints(root)
    if aside:
        held.append(f"{len(aside)} set-aside checkpoint(s) ({_steps_text(aside)})")
    if (run_dir / FINAL_DIR).exists():
        held.append(f"the finished model {run_dir / FINAL_DIR}")
    return held


def _refuse_unloadable(run_dir: Path, survey: CheckpointSurvey, mode: str) -> RunDirectoryError:
    lines = [f"  {u.path.name}: {u.reason}" for u in survey.unloadable]
    final = f"; it also holds the finished model {run_dir / FINAL_DIR}" if (run_dir / FINAL_DIR).exists() else ""
    return RunDirectoryError(
        f"run directory {run_dir}: none of its {len(survey.unloadable)} checkpoint(s) in {survey.root} can be "
        f"loaded{final}, so checkpoint.resume={mode} refuses to start the run over on top of them (nothing was "
        "moved or deleted):\n" + "\n".join(lines) + "\n"
        f"Restore an intact copy of a checkpoint and pass --resume PATH (checkpoint.resume=PATH), pass {_NEW_NAME}, "
        f"or pass {_OVERWRITE}.")


def check_run_directory(run_dir: str | Path, cfg: TrainConfig, *, launch_id: str | None = None,
                        hash_files: bool = True) -> RunStart:
    """Decide what a start with ``cfg`` does with ``run_dir`` (STORAGE/NAME), or raise
    ``RunDirectoryError`` naming the directory, what it holds and the options. Reads only (the
    launcher may call it on the driver; the Trainer's rank 0 calls it again before writing anything).
    ``launch_id``: this launch's id (None on the driver): equal to the recorded one, this is a restart.

    Cost: with checkpoint.resume=auto the newest checkpoint is verified, every file hashed (the
    Trainer reuses the result instead of hashing again). ``hash_files=False`` checks manifests and
    sizes only: the driver's early check, which must not read a multi-GB checkpoint that rank 0 is
    about to hash anyway."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    mode = cfg.checkpoint.resume
    overwrite = bool(cfg.run.overwrite)
    if overwrite and mode != "never":
        raise RunDirectoryError(f"run directory {run_dir}: run.overwrite=true (--overwrite) starts a new run in place "
                                f"of the old one, but checkpoint.resume={mode} would continue one: pass --resume never "
                                "with --overwrite, or drop --overwrite")
    aside = set_aside_checkpoints(root)
    if launch_id is not None and recorded_launch(run_dir) == launch_id:
        survey = survey_checkpoints(root, hash_files=hash_files)
        log_survey(survey)
        if survey.latest is not None:
            return RunStart(run_dir, "auto", survey.latest, True, survey, set_aside=aside)
        if survey.unloadable:
            raise _refuse_unloadable(run_dir, survey, "auto (a restart of this launch)")
        # The launch committed nothing yet: start as it started (a path again, or fresh).
        return RunStart(run_dir, mode, None, True, survey, set_aside=aside)
    if mode == "auto":
        survey = survey_checkpoints(root, hash_files=hash_files)
        log_survey(survey)
        if survey.latest is not None:
            return RunStart(run_dir, "auto", survey.latest, False, survey, set_aside=aside)
        if survey.unloadable:
            raise _refuse_unloadable(run_dir, survey, mode)
        held = _holdings(run_dir)
        if held:
            raise RunDirectoryError(
                f"run directory {run_dir} holds {'; '.join(held)} but no checkpoint to continue from, so "
                "checkpoint.resume=auto would start a new run over it (nothing was changed). Pass "
                f"{_NEW_NAME}, or {_OVERWRITE}.")
        return RunStart(run_dir, "auto", None, False, survey, set_aside=aside)
    if mode == "never":
        held = _holdings(run_dir)
        if held and not overwrite:
            raise RunDirectoryError(
                f"run directory {run_dir} already holds a run: {'; '.join(held)}. checkpoint.resume=never starts a "
                f"new run and will not replace it (nothing was changed). Pass {_CONTINUE}, "
                f"--overwrite (run.overwrite=true) to delete it and start a new run in its place, or {_NEW_NAME}.")
        replace = [run_dir / CHECKPOINTS_DIR, run_dir / FINAL_DIR, *(run_dir / f for f in RUN_FILES)]
        return RunStart(run_dir, "never", replace=[p for p in replace if overwrite and p.exists()])
    # A checkpoint directory: its manifest and file sizes checked now, so that a path that is not a
    # checkpoint is refused on the driver before any worker starts (rank 0 hashes it as it loads).
    verify_directory(Path(mode), hash_files=False)
    return RunStart(run_dir, mode, set_aside=aside)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def claim_run_directory(start: RunStart, launch_id: str | None) -> None:
    """Carry out ``start`` on the run directory (rank 0, once per start, before anything is written):
    delete what --overwrite replaces, listing it in the log first; record the launch id; report the
    set-aside checkpoints, which only the user deletes."""
    for path in start.replace:
        what = "directory" if path.is_dir() else "file"
        log.warning("run.overwrite: deleting %s %s (%.1f MiB) of the run being replaced", what, path,
                    _size(path) / 2**20)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if start.set_aside and not start.replace:
        log.warning("%d checkpoint(s) set aside by earlier starts of this run (%.1f MiB: %s) are kept: they are "
                    "not used and fr_train never deletes them; remove them when you no longer need them",
                    len(start.set_aside), sum(_size(p) for p in start.set_aside) / 2**20,
                    ", ".join(str(p) for p in start.set_aside))
    start.run_dir.mkdir(parents=True, exist_ok=True)
    if launch_id is not None and not start.restart:
        tmp = start.run_dir / f".{LAUNCH_FILE}.partial"
        tmp.write_text(json.dumps({"launch": launch_id, "time": time.time()}) + "\n")
        os.replace(tmp, start.run_dir / LAUNCH_FILE)
