"""Atomic, verifiable, asynchronous, sharded checkpoints: ``CheckpointManager`` and ``LoadedCheckpoint``.

Layout of one checkpoint (storage shared by all ranks, e.g. the Ray Train storage path)::

    ROOT/step_000001000/rank_0.pt … rank_{W-1}.pt   each rank's payload (head shard, data, RNG, counters)
                        backbone.pt                 rank 0's shared payload (consolidated backbone + optimizer)
                        meta.json                   run facts: step, world size, num_classes, config, code version
                        MANIFEST.json               every file's size and sha256, written last
    ROOT/set_aside/step_…     checkpoints off the run's timeline (unloadable, or newer than the step
                              the run continued from), moved whole; never deleted or overwritten

Commit protocol (no collective, because the writes run in a background thread while the training
loop keeps using the process group; collectives from two threads on one group can interleave and
deadlock): every rank writes into ``ROOT/.tmp-step_<step>-<session>/``, fsyncs, then atomically
publishes ``rank_<r>.done.json`` with its file's size and sha256 (hashed while writing). Rank 0 waits
for all W markers, writes ``meta.json`` and the manifest, fsyncs and renames the directory to
``step_<step>``. The session token (the same on all ranks, new per attempt) keeps a crashed attempt's
leftovers out of a later attempt's commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fr_train.checkpointing.files import (
    MANIFEST,
    CorruptCheckpointError,
    FileEntry,
    fsync_dir,
    verify_directory,
    write_json,
    write_manifest,
    write_torch,
)
from fr_train.checkpointing.resume import (
    META_FORMAT,
    check_compatible,
    check_rank_payload,
    code_version,
    reshard_rank_payloads,
)
from fr_train.checkpointing.snapshot import snapshot

log = logging.getLogger("fr_train.checkpoint")

RANK_FORMAT = "fr_train.checkpoint.rank/1"
SHARED_FORMAT = "fr_train.checkpoint.shared/1"
SHARED_FILE = "backbone.pt"
META_FILE = "meta.json"
META_REQUIRED = ("epoch", "samples_seen", "num_classes", "config")
_STEP_DIR = re.compile(r"^step_(\d{9,})$")
_TMP_DIR = re.compile(r"^\.tmp-step_(\d{9,})-")
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
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
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


def survey_checkpoints(root: str | Path) -> CheckpointSurvey:
    """Verify the ``step_*`` directories under ``root`` newest first, up to the first loadable one.
    Reads only; nothing is moved or deleted. Why it stops there: verifying hashes every file (GBs
    for a large head), and older checkpoints play no part in a resume once a newer one loads."""
    root = Path(root)
    unloadable: list[Unloadable] = []
    for step, path in committed_steps(root):
        try:
            return CheckpointSurvey(root, load_checkpoint(path), unloadable)
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


@dataclass
class SaveTiming:
    """Seconds of one save: ``stall`` is what the caller waited (host copy), ``write`` the background part."""

    step: int
    stall: float = 0.0
    write: float = 0.0
    bytes_written: int = 0


@dataclass
class _Pending:
    thread: threading.Thread
    timing: SaveTiming
    error: list[BaseException] = field(default_factory=list)


class CheckpointManager:
    """One rank's side of sharded checkpoints under ``root`` (a path every rank sees).

    ``save_async`` copies the state to host memory (the only stall), then writes in a background
    thread; a second ``save_async``, ``wait`` and ``close`` wait for the previous write and re-raise its
    error. Rank 0 commits (manifest + rename) and prunes to the newest ``keep``.
    """

    def __init__(self, root: str | Path, keep: int, rank: int, world: int, *, session: str | None = None,
                 commit_timeout_s: float = 1800.0, poll_s: float = 0.05) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of size {world}")
        if session is None:
            if world > 1:
                raise ValueError("CheckpointManager: with several ranks pass session=broadcast_session_token() "
                                 "(the same token on every rank)")
            session = new_session_token()
        if not re.fullmatch(r"[A-Za-z0-9_]+", session):
            raise ValueError(f"session token {session!r} must be letters, digits or '_' (it names a directory)")
        self.root, self.keep, self.rank, self.world, self.session = Path(root), keep, rank, world, session
        self.commit_timeout_s, self.poll_s = commit_timeout_s, poll_s
        self.code_version = code_version() if rank == 0 else ""
        self._pending: _Pending | None = None
        self._last_step: int | None = None
        self.last_timing: SaveTiming | None = None

    # Saving ----------------------------------------------------------------------------------------
    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}-{self.session}"

    def save_async(self, step: int, payload: dict[str, Any], shared: dict[str, Any] | None = None,
                   meta: dict[str, Any] | None = None, *, private_payload: bool = False) -> None:
        """Checkpoint ``step``. ``payload``: this rank's state (resume.py's convention); ``shared`` and
        ``meta`` (rank 0 only): the backbone state and the JSON run facts ``epoch``, ``samples_seen``,
        ``num_classes``, ``config``. Returns once the state is copied to host memory.

        ``private_payload=True``: every CPU tensor of ``payload`` is already a private copy that nobody
        mutates (``PartialFC.state_dict()`` clones its rows), so it is not copied a second time. The
        shared payload is always copied (``module.state_dict()`` returns the live parameters)."""
        self.wait()
        if self._last_step is not None and step <= self._last_step:
            # Re-saving a step would reuse its temporary directory while rank 0 may still be
            # committing it on another host.
            raise ValueError(f"step {step} is not after the last saved step {self._last_step}: save each step once "
                             "(e.g. an epoch end that coincides with every_steps)")
        t0 = time.perf_counter()
        check_rank_payload(payload, f"rank {self.rank} payload")
        if payload["train"]["step"] != step:
            raise ValueError(f"rank {self.rank} payload: field 'train.step' is {payload['train']['step']}, saving step {step}")
        full_meta = None
        if self.rank == 0:
            if meta is None or any(k not in meta for k in META_REQUIRED):
                raise ValueError(f"rank 0 must pass meta with {list(META_REQUIRED)}")
            full_meta = {**meta, "format": META_FORMAT, "step": step, "world_size": self.world,
                         "session": self.session, "code_version": self.code_version, "time": time.time()}
            json.dumps(full_meta)  # not JSON-able: fail now, in the caller's thread
        elif shared is not None or meta is not None:
            raise ValueError(f"rank {self.rank}: only rank 0 writes the shared payload and meta")
        rank_blob = snapshot({"format": RANK_FORMAT, "rank": self.rank, "world_size": self.world, "step": step,
                              "payload": payload}, clone_cpu_tensors=not private_payload,
                             path=f"rank {self.rank} payload")
        shared_blob = None if shared is None else snapshot(
            {"format": SHARED_FORMAT, "step": step, "payload": shared}, path="shared payload")
        timing = SaveTiming(step, stall=time.perf_counter() - t0)
        pending = _Pending(threading.Thread(), timing)
        pending.thread = threading.Thread(target=self._write, args=(step, [rank_blob, shared_blob], full_meta, pending),
                                          name=f"checkpoint-step-{step}", daemon=False)
        self._pending, self._last_step = pending, step
        pending.thread.start()

    def save(self, step: int, payload: dict[str, Any], shared: dict[str, Any] | None = None,
             meta: dict[str, Any] | None = None, *, private_payload: bool = False) -> None:
        """Synchronous save (final checkpoint at exit, or a preemption with seconds left)."""
        self.save_async(step, payload, shared, meta, private_payload=private_payload)
        self.wait()

    def wait(self) -> None:
        """Block until the previous save is written (and, on rank 0, committed); re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.thread.join()
        self.last_timing = pending.timing
        if pending.error:
            raise RuntimeError(f"checkpoint of step {pending.timing.step} under {self.root} failed on rank "
                               f"{self.rank}: {pending.error[0]}") from pending.error[0]

    def close(self) -> None:
        self.wait()

    def _write(self, step: int, blobs: list[Any], meta: dict[str, Any] | None, pending: _Pending) -> None:
        """``blobs`` = [rank payload, shared payload], popped as written so their host memory is freed
        while rank 0 still waits for the other ranks (a Thread keeps its args alive until it ends)."""
        t0 = time.perf_counter()
        try:
            tmp = self.tmp_dir(step)
            tmp.mkdir(parents=True, exist_ok=True)
            shared_blob = blobs.pop()
            entry = write_torch(tmp / rank_file(self.rank), blobs.pop())
            marker = tmp / f"rank_{self.rank}.done.json"
            write_json(marker.with_suffix(".partial"), entry.to_dict())
            os.replace(marker.with_suffix(".partial"), marker)  # atomic publish of "my file is complete"
            pending.timing.bytes_written = entry.size
            if self.rank == 0:
                assert meta is not None
                pending.timing.bytes_written += self._commit(step, tmp, shared_blob, meta)
            del shared_blob
        except BaseException as e:
            pending.error.append(e)
            log.error("checkpoint step %d: write failed on rank %d: %s", step, self.rank, e)
            if self.rank != 0:  # tell rank 0 now, instead of letting it wait for the commit timeout
                with contextlib.suppress(OSError):
                    write_json(self.tmp_dir(step) / f"rank_{self.rank}.failed.json", {"error": repr(e)})
        finally:
            pending.timing.write = time.perf_counter() - t0

    def _commit(self, step: int, tmp: Path, shared_blob: Any, meta: dict[str, Any]) -> int:
        files: dict[str, FileEntry] = {}
        if shared_blob is not None:
            files[SHARED_FILE] = write_torch(tmp / SHARED_FILE, shared_blob)
        files.update(self._await_ranks(step, tmp))
        files[META_FILE] = write_json(tmp / META_FILE, meta)
        for r in range(self.world):
            (tmp / f"rank_{r}.done.json").unlink()
        write_manifest(tmp, step, files)  # last: the checkpoint exists from here on
        fsync_dir(tmp)
        final = self.root / step_dir_name(step)
        self._set_aside_off_timeline(step)
        # A directory left at ``final`` (a race we do not expect) makes this rename fail instead of
        # replacing it: a commit never overwrites a checkpoint.
        os.replace(tmp, final)
        fsync_dir(self.root)
        self._prune(step)
        return sum(e.size for name, e in files.items() if name in (SHARED_FILE, META_FILE))

    def _await_ranks(self, step: int, tmp: Path) -> dict[str, FileEntry]:
        deadline = time.monotonic() + self.commit_timeout_s
        entries: dict[str, FileEntry] = {}
        while True:
            for r in range(self.world):
                marker = tmp / f"rank_{r}.done.json"
                if rank_file(r) not in entries and marker.is_file():
                    entries[rank_file(r)] = FileEntry(**json.loads(marker.read_text()))
            if len(entries) == self.world:
                return entries
            failed = sorted(tmp.glob("rank_*.failed.json"))
            if failed:
                raise RuntimeError(f"{failed[0]}: {json.loads(failed[0].read_text())['error']}; step {step} "
                                   "is not committed")
            if time.monotonic() > deadline:
                missing = [r for r in range(self.world) if rank_file(r) not in entries]
                raise TimeoutError(f"{tmp}: rank(s) {missing} did not finish writing step {step} within "
                                   f"{self.commit_timeout_s:.0f}s (crashed or storage not shared?); "
                                   "the checkpoint is not committed")
            time.sleep(self.poll_s)

    def _set_aside_off_timeline(self, step: int) -> None:
        """Checkpoints at or after the step being committed are not on this run's timeline: the run
        continued from an older checkpoint, because these could not be loaded or because --resume named
        an older one. Left where they are, ``find_latest`` could later resume them (jumping back to the
        old timeline), and the commit of the same step would replace one. So they move, whole and
        untouched, to ``SET_ASIDE_DIR``, under their own name (plus this session's token when that
        name is taken): fr_train never deletes or overwrites them there. They are rare by design: a
        restart resumes the newest loadable checkpoint, so only damage or an explicit older --resume
        puts one there; the Trainer reports their number and size at every start."""
        newer = [path for s, path in committed_steps(self.root) if s >= step]
        if not newer:
            return
        aside = self.root / SET_ASIDE_DIR
        aside.mkdir(exist_ok=True)
        for path in newer:
            target = aside / path.name
            if target.exists():
                target = aside / f"{path.name}-{self.session}"
            log.warning("checkpoint %s is not on this run's timeline (the run continued from an older checkpoint "
                        "before step %d: it could not be loaded, or --resume named an older one): moved to %s; "
                        "fr_train never deletes it: remove it when you no longer need it", path, step, target)
            os.rename(path, target)  # rename, not replace: never onto an existing directory
        fsync_dir(aside)

    def _prune(self, step: int) -> None:
        kept = 0
        for s, path in committed_steps(self.root):
            if not (path / MANIFEST).is_file():
                continue  # not a checkpoint; left for inspection, never counted
            kept += 1
            if kept > self.keep and s != step:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.iterdir():
            m = _TMP_DIR.match(path.name)
            # .trash-*: a replaced checkpoint fr_train versions before issue 14 had begun to delete
            if (m and int(m.group(1)) <= step and path.name != self.tmp_dir(step).name) or \
                    path.name.startswith(".trash-"):
                shutil.rmtree(path, ignore_errors=True)

    # Loading ---------------------------------------------------------------------------------------
    def latest(self) -> LoadedCheckpoint | None:
        """The newest valid checkpoint (each skipped one logged with the file and the reason)."""
        return find_latest(self.root)

    def load(self, path: str | Path) -> LoadedCheckpoint:
        return load_checkpoint(path)
