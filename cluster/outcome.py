"""The driver's last line: how the run ended, in facts the user can act on.

Why: the failure line used to say "FAILED after run.max_failures=3 restarts … the newest checkpoint
is intact: run the same command to resume" whatever happened: after a single attempt, with no
checkpoint at all, or when the same command could not succeed (issue 28). Each fact is now looked
up: the attempts Ray Train made (counted by ``AttemptCounter`` as they fail), the newest checkpoint
that would be resumed (fr_train's own survey of ``RUN/checkpoints``, the same one a resume runs),
and the cause as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from cluster.failures import one_line
from fr_train.checkpointing.loading import survey_checkpoints
from fr_train.checkpointing.rundir import CHECKPOINTS_DIR

ATTEMPTS_NAME = "failed_attempts.jsonl"  # in the run directory, this launch's; cleared at the next


class AttemptCounter(UserCallback):
    """Appends one line per failed attempt of the worker group to ``path`` (in the run directory: Ray
    Train calls it in its controller actor, which may run on another node than the driver)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        line = {"ranks": sorted(worker_exceptions), "errors": [one_line(e)[:300] for e in worker_exceptions.values()]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def failed_attempts(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def root_cause(error: BaseException | None) -> str:
    """The innermost error's one line out of Ray's wrapping (the worker's traceback is in its log)."""
    if error is None:
        return "the run ended without a result"
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in text if ":" in line and line.split(":", 1)[0].split(".")[-1].endswith(("Error",
                                                                                                    "Exception"))]
    return raised[-1] if raised else one_line(error)


def resume_point(run_dir: Path) -> str:
    """What the same command would resume from, as a clause: the newest loadable checkpoint, or why none."""
    root = run_dir / CHECKPOINTS_DIR
    try:
        survey = survey_checkpoints(root, hash_files=False)  # manifests and sizes: the driver stays fast
    except OSError as exc:
        return f"its checkpoints cannot be read ({exc})"
    if survey.latest is not None:
        return (f"the same command resumes from its newest checkpoint {survey.latest.path} "
                f"(step {survey.latest.step})")
    if survey.unloadable:
        return (f"none of its {len(survey.unloadable)} checkpoint(s) in {root} can be loaded (newest: "
                f"{survey.unloadable[0].reason}); the same command refuses to start over them")
    return f"it has no checkpoint (none in {root}): the same command starts it from step 0"


def failure_line(name: str, run_dir: Path, error: BaseException | None, attempts: int, max_failures: int,
                 fatal: dict[str, Any] | None) -> str:
    """One line for a run that failed: the cause, the attempts made, what resuming would do."""
    if fatal is not None:
        how = "not retried: a restart cannot fix it"
        cause = str(fatal["error"])
    elif attempts == 0:
        how = "Ray Train's controller failed before a worker group ran"
        cause = root_cause(error)
    else:
        how = f"after {attempts} attempt(s); run.max_failures={max_failures} allows {max_failures + 1}"
        cause = root_cause(error)
    return f"run {name} FAILED ({how}): {cause}. Fix the cause; {resume_point(run_dir)}"


def run_finished(run_dir: Path) -> bool:
    """Whether rank 0's log ends on the run's end record (its last step done, its model exported)."""
    from fr_train.train.records import read_events

    records = read_events(run_dir)
    return bool(records) and records[-1].get("event") == "end"


def summarize_run(run_dir: Path) -> str:
    """How the run ended, from rank 0's JSON-lines log: what it reached, then where the model, the
    log and the curves are and the one command that shows the curves (one line each)."""
    from fr_train.train.records import LOG_NAME, read_events
    from fr_train.train.tensorboard_sink import TENSORBOARD_DIR

    log_path = run_dir / LOG_NAME
    records = read_events(run_dir)
    evals = [r for r in records if r.get("event") == "eval"]
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    if end is None:
        return f"run finished without an end record; see {log_path}"
    parts = [f"finished {end['step']} steps"]
    for name in dict.fromkeys(r["set"] for r in evals):
        first = next(r for r in evals if r["set"] == name)
        last = [r for r in evals if r["set"] == name][-1]
        parts.append(f"{name}: accuracy {first['accuracy']:.4f} (step {first['step']}) -> "
                     f"{last['accuracy']:.4f} (step {last['step']})")
    for r in records:
        if r.get("event") == "ijb_error":
            parts.append(f"IJB evaluation failed: {r['error']}")
    for r in end.get("ijb", []):
        if r["protocol"] == "1:1":
            parts.append(f"{r['set']} 1:1: TAR@FAR=1e-4 {r['tar_at_far']['0.0001']:.4f}, 1e-3 {r['tar_at_far']['0.001']:.4f}")
        else:
            parts.append(f"{r['set']} 1:N: rank-1 {r['rank1']:.4f}")
    lines = ["; ".join(parts), f"model {end['final_dir']}", f"log {log_path}"]
    if (run_dir / TENSORBOARD_DIR).is_dir():
        lines.append(f"curves {run_dir / TENSORBOARD_DIR}: tensorboard --logdir {run_dir.parent}")
    return "\n".join(lines)
