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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fr_train.checkpointing.files import (
    MANIFEST,
    FileEntry,
    fsync_dir,
    write_json,
    write_manifest,
    write_torch,
)
from fr_train.checkpointing.loading import (
    META_FILE,
    META_REQUIRED,
    RANK_FORMAT,
    SET_ASIDE_DIR,
    SHARED_FILE,
    SHARED_FORMAT,
    TMP_DIR_PATTERN,
    LoadedCheckpoint,
    committed_steps,
    find_latest,
    load_checkpoint,
    new_session_token,
    rank_file,
    step_dir_name,
)
from fr_train.checkpointing.resume import (
    META_FORMAT,
    check_rank_payload,
    code_version,
)
from fr_train.checkpointing.snapshot import snapshot
from fr_train.checkpointing.staging import HostStaging
from fr_train.checkpointing.stateful import CheckpointStates

log = logging.getLogger("fr_train.checkpoint")


@dataclass
class SaveTiming:
    """Seconds of one save: ``stall`` is what the caller waited (host copy), ``write`` the background part;
    ``staged_bytes``: host staging memory this save had to allocate (0 once the buffers are reused)."""

    step: int
    stall: float = 0.0
    write: float = 0.0
    bytes_written: int = 0
    staged_bytes: int = 0


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

    The host copies go into staging buffers the manager owns (staging.py), reused from one save to
    the next: they stay allocated between saves (the size of one checkpoint of this rank in host
    memory) until ``close()``. ``pin_memory=True`` (the caller's choice: the trainer sets it when it
    trains on CUDA) page-locks the buffers of device tensors, so their copies run at PCIe speed
    without blocking per tensor; leave it False on the CPU, where there is nothing to pin for.
    """

    def __init__(self, root: str | Path, keep: int, rank: int, world: int, *, session: str | None = None,
                 commit_timeout_s: float = 1800.0, poll_s: float = 0.05, states: CheckpointStates | None = None,
                 pin_memory: bool = False) -> None:
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
        self.states = states  # what save_states/restore_states save and restore (stateful.py)
        self.staging = HostStaging(pin_memory=pin_memory)  # reused by every save once the previous write is done
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
        shared payload is always copied (``module.state_dict()`` returns the live parameters).

        Every other tensor is copied into this manager's staging buffer for its key path (reused
        from the previous save, whose write this call first waits for); device tensors are all
        copied before one synchronisation per device, so the writer never sees a partial copy."""
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
        rank_blob, shared_blob = self._stage(step, payload, shared, private_payload)
        timing = SaveTiming(step, stall=time.perf_counter() - t0, staged_bytes=self.staging.allocated_bytes)
        pending = _Pending(threading.Thread(), timing)
        pending.thread = threading.Thread(target=self._write, args=(step, [rank_blob, shared_blob], full_meta, pending),
                                          name=f"checkpoint-step-{step}", daemon=False)
        self._pending, self._last_step = pending, step
        pending.thread.start()

    def _stage(self, step: int, payload: dict[str, Any], shared: dict[str, Any] | None,
               private_payload: bool) -> tuple[Any, Any]:
        """The host copies of a save (rank blob, shared blob), in the staging buffers. The caller has
        waited for the previous write: its buffers are free to be overwritten."""
        with self.staging.copying():  # its exit waits for the device→host copies
            rank_blob = snapshot({"format": RANK_FORMAT, "rank": self.rank, "world_size": self.world, "step": step,
                                  "payload": payload}, clone_cpu_tensors=not private_payload,
                                 path=f"rank {self.rank} payload", staging=self.staging)
            shared_blob = None if shared is None else snapshot(
                {"format": SHARED_FORMAT, "step": step, "payload": shared}, path="shared payload",
                staging=self.staging)
        return rank_blob, shared_blob

    def stage_ahead(self) -> int:
        """Allocate the staging buffers now, from the components' current state (copied once and
        dropped), so that the run's first save stalls no longer than its later ones: the first save
        would otherwise allocate them, and page-locking a GPU rank's ~8 GiB takes seconds (issue 13).
        Collective entries are left to the first save (a consolidated ZeRO optimizer state does not
        exist before the first step, and gathering it is a collective); so is any state a component
        creates later (the backbone's momentum at its first step). Call it after resuming, before
        training. Returns the bytes allocated."""
        if self.states is None:
            raise ValueError("CheckpointManager.stage_ahead: no states were handed to this manager")
        payload, shared = self.states.collect(self.rank, copy=False, collectives=False)
        self.wait()
        self._stage(-1, payload, shared, private_payload=False)
        return self.staging.allocated_bytes

    def save_states(self, step: int, meta: dict[str, Any] | None, *, sync: bool = False) -> None:
        """Checkpoint ``step`` from the components handed in as ``states`` (each saves itself);
        ``meta``: rank 0's run facts (see save_async), None on the other ranks. The components hand
        over their live tensors (``collect(copy=False)``: the heads skip their own host copies), so
        the staging buffers are the only copy a save makes."""
        if self.states is None:
            raise ValueError("CheckpointManager.save_states: no states were handed to this manager")
        payload, shared = self.states.collect(self.rank, copy=False)
        save = self.save if sync else self.save_async
        save(step, payload, shared, meta if self.rank == 0 else None)

    def restore_states(self, ckpt: LoadedCheckpoint, *, skip: tuple[str, ...] = ()) -> list[str]:
        """Restore the components from ``ckpt`` (re-split for this world size when it differs);
        return the keys it holds no state for (the caller's fallbacks). ``skip``: rank-payload keys
        to leave out, as if the checkpoint lacked them (a position that no longer means anything)."""
        if self.states is None:
            raise ValueError("CheckpointManager.restore_states: no states were handed to this manager")
        shared = ckpt.shared()
        if shared is None and any(s.shared for s in self.states.states):
            raise ValueError(f"{ckpt.path}: has no {SHARED_FILE}; it is not a checkpoint of a training run")
        payload = {k: v for k, v in ckpt.payload_for(self.rank, self.world).items() if k not in skip}
        return self.states.restore(payload, shared or {})

    def save(self, step: int, payload: dict[str, Any], shared: dict[str, Any] | None = None,
             meta: dict[str, Any] | None = None, *, private_payload: bool = False) -> None:
        """Synchronous save (final checkpoint at exit, or a preemption with seconds left)."""
        self.save_async(step, payload, shared, meta, private_payload=private_payload)
        self.wait()

    def wait(self) -> None:
        """Block until the previous save is written (and, on rank 0, committed); re-raise its error."""
        pending = self._pending
        if pending is None:
            return
        # Cleared only once the writer has ended: a join cut short (a signal) must not let the next
        # save overwrite staging buffers the writer is still reading.
        pending.thread.join()
        self._pending = None
        self.last_timing = pending.timing
        if pending.error:
            raise RuntimeError(f"checkpoint of step {pending.timing.step} under {self.root} failed on rank "
                               f"{self.rank}: {pending.error[0]}") from pending.error[0]

    def close(self) -> None:
        """Wait for the last write, then release the staging buffers (a later save allocates them again)."""
        try:
            self.wait()
        finally:
            self.staging.release()

    def _write(self, step: int, blobs: list[Any], meta: dict[str, Any] | None, pending: _Pending) -> None:
        """``blobs`` = [rank payload, shared payload], popped as written so the tensors that are not
        staging buffers (a ``private_payload``'s own copies) are freed while rank 0 still waits for the
        other ranks (a Thread keeps its args alive until it ends); the staging buffers stay for the
        next save."""
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
            m = TMP_DIR_PATTERN.match(path.name)
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
