"""What Ray Train keeps in a run directory, and why fr_train keeps Ray's checkpoint list out of it.

Ray Train (2.60) records every checkpoint reported to it in ``RUN/checkpoint_manager_snapshot.json``
and, when a new launch starts the run again (a new ``TorchTrainer.fit``), rebuilds its checkpoint
manager from that file and refuses to start (``CheckpointManagerInitializationError``, a controller
error: no retry) if a checkpoint it lists is gone, or if the file is empty or not JSON. fr_train
prunes its own checkpoints (``checkpoint.keep``, never one newer than the run resumed from) and a
full disk truncates Ray's file: two bookkeepers of one directory diverged, and every run that had
written more than ``checkpoint.keep`` checkpoints could not be resumed by a later launch (issue 28).

Ray offers no call to drop a checkpoint from its list, and its own pruning (``num_to_keep``) would
delete directories by its rule, not fr_train's. So fr_train is the one record: workers report
metrics to Ray with no ``Checkpoint`` (the committed checkpoint's path travels as a metric), Ray
never writes the snapshot, and a snapshot an older fr_train left behind is set aside (renamed, not
deleted) by the driver before Ray reads it. Resumes never used Ray's list: the Trainer resumes from
the newest manifest-verified ``checkpoints/step_*`` (fr_train/checkpointing).
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
SET_ASIDE_SUFFIX = ".set-aside"


def set_aside_ray_snapshot(run_dir: Path) -> Path | None:
    """Rename Ray's checkpoint-manager snapshot in ``run_dir`` (stale, empty or garbage: fr_train does
    not read it) to ``…json.set-aside``, replacing an earlier set-aside copy. Returns the new path, or
    None when there was none. Call before ``TorchTrainer.fit`` (Ray reads the file when it starts)."""
    snapshot = run_dir / RAY_SNAPSHOT
    if not snapshot.is_file():
        return None
    aside = snapshot.with_name(snapshot.name + SET_ASIDE_SUFFIX)
    os.replace(snapshot, aside)
    return aside
