"""The Trainer's checkpoint side: may this start use the run directory, resume from what it
chose, save (every rank its shard; rank 0 the backbone and its optimizer), the preemption notice,
and which committed checkpoint to report.

A mixin of Trainer (fr_train/train/trainer.py), kept apart so the loop reads top to bottom; it
uses the trainer's cfg, rank, world, engine, head, distill, data, state, metrics and run_dir.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from fr_train.console import log
from fr_train.train.components import seed_everything

if TYPE_CHECKING:
    from fr_train.checkpointing import RunStart
    from fr_train.checkpointing.stateful import CheckpointStates


class CheckpointingMixin:
    def _claim_run_directory(self, launch_id: str | None) -> RunStart:
        """Rank 0 checks the run directory (check_run_directory: refuses with RunDirectoryError) and,
        when the check passes, carries out what the start asks (--overwrite's deletion); the outcome
        reaches every rank before any collective of the build, so a refusal stops all ranks at once
        instead of leaving the others waiting in deepspeed.initialize for a rank 0 that has left."""
        from fr_train.checkpointing import (
            RunDirectoryError,
            RunStart,
            check_run_directory,
            claim_run_directory,
        )

        start: RunStart | None = None
        failure: Exception | None = None
        if self.rank == 0:
            try:
                start = check_run_directory(self.run_dir, self.cfg, launch_id=launch_id)
                claim_run_directory(start, launch_id)
            except Exception as e:  # any failure (storage errors too) must reach the other ranks
                failure = e
        if self.world > 1 and dist.is_initialized():
            refused = isinstance(failure, RunDirectoryError)
            box: list[Any] = [None if failure is None else (refused, f"{type(failure).__name__}: {failure}"),
                              None if start is None else start.resume_path]
            dist.broadcast_object_list(box, src=0)
            if self.rank != 0:
                if box[0] is not None:
                    kind = RunDirectoryError if box[0][0] else RuntimeError
                    raise kind(f"rank {self.rank}: rank 0 could not start the run: {box[0][1]}")
                # The others load the checkpoint rank 0 chose (and verified): the same on every rank.
                start = RunStart(self.run_dir, "never" if box[1] is None else box[1])
        if failure is not None:
            raise failure
        assert start is not None
        return start

    def _setup_checkpointing(self) -> None:
        from fr_train.checkpointing import CheckpointManager, SavePolicy, broadcast_session_token

        c = self.cfg.checkpoint
        distributed = self.world > 1 and dist.is_initialized()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        session = broadcast_session_token() if distributed else None
        # Pinned staging buffers when the state lives on a GPU (page-locked host memory needs a CUDA
        # device): the device→host copy of a save runs at PCIe speed (issue 13); they hold one
        # checkpoint of this rank in host memory until close() (checkpoint.pin_host_memory).
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", c.keep, self.rank, self.world, session=session,
                                      states=self._checkpoint_states(),
                                      pin_memory=c.pin_host_memory and self.device.type == "cuda")
        self.save_policy = SavePolicy(c.every_steps, c.every_minutes)
        self.last_saved_step = -1
        self.resumed_from: str | None = None
        self._resume()
        # The staging buffers now, not in the first save's stall (what exists yet: a fresh run's
        # backbone momentum appears at its first step and is staged by the first save).
        self.ckpt.stage_ahead()

    def _checkpoint_states(self) -> CheckpointStates:
        """Every component with state, each saving and restoring itself (checkpointing/stateful.py),
        in the order a resume restores them: counters, head shard, reader position, backbone and its
        optimizer, distillation thresholds, and the RNG streams last."""
        from fr_train.checkpointing.deepspeed_state import BackboneOptimizer, BackboneWeights
        from fr_train.checkpointing.rng import ProcessRng
        from fr_train.checkpointing.stateful import CheckpointStates, State, Stateful

        self.backbone_optimizer = BackboneOptimizer(self.engine)
        states = [State("train", self.state), State("head", self.head)]
        if isinstance(self.data, Stateful):  # DALI's reader position; an in-memory test source has none
            states.append(State("data", self.data))
        states += [State("backbone", BackboneWeights(self.engine), shared=True), *self.backbone_optimizer.states()]
        if self.distill is not None:
            states.append(State("distill", self.distill, shared=True))
        states.append(State("rng", ProcessRng()))
        return CheckpointStates(tuple(states))

    def _resume(self) -> None:
        """What the start decided (``self.start``, from checkpoint.resume): continue the newest loadable
        checkpoint of this run (auto), a given checkpoint directory, or nothing (never, or auto with no
        checkpoint in a fresh directory)."""
        from fr_train.checkpointing import load_checkpoint
        from fr_train.checkpointing.deepspeed_state import LAYOUT_REPLICATED

        path = self.start.resume_path
        if path is None:
            return
        # rank 0 hashed every file of an auto-chosen checkpoint in check_run_directory: not twice
        ckpt = load_checkpoint(path, hash_files=self.rank == 0 and self.start.resume_from is None)
        ckpt.check_compatible(self.cfg.to_dict(), self.num_classes)
        self.backbone_optimizer.check_layout(ckpt.meta.get("backbone_optimizer_layout", LAYOUT_REPLICATED), str(path))
        # Another batch size or accumulation: the reader's position (counted in batches) and the RNG
        # streams no longer mean anything, but the sample count does, as across a world-size change.
        saved = ckpt.meta.get("config", {})
        was = (saved.get("data", {}).get("batch_size"), saved.get("run", {}).get("grad_accum"))
        now = (self.cfg.data.batch_size, self.cfg.run.grad_accum)
        rebatched = was != now
        missing = self.ckpt.restore_states(ckpt, skip=("data", "rng") if rebatched else ())
        if rebatched and self.rank == 0:
            log.info(f"data.batch_size × run.grad_accum was {was[0]} × {was[1]} in {path}, now {now[0]} × {now[1]}: "
                     f"the reader restarts epoch {self.state.epoch} past the {self.state.epoch_samples} samples "
                     "it had seen (the batches that follow differ from an uninterrupted run's)")
        self.backbone_optimizer.check_restored()
        if "data" in missing or "data" not in {s.key for s in self.ckpt.states.states}:
            self._skip_to(self.state.epoch_samples)  # another world size, or a source without a reader state
        if "rng" in missing:  # another world size: a fresh, deterministic stream per rank
            seed_everything(self.cfg.run.seed + 1_000_003 * self.state.step + self.rank)
        self.last_saved_step = self.state.step
        self.resumed_from = path
        self.metrics.mark_resume()
        if self.rank == 0:
            log.info(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                     f"saved by {ckpt.world_size} rank(s), now {self.world})")

    def save_checkpoint(self, sync: bool = False) -> None:
        """Every rank writes its shard (head, data position, RNG); rank 0 adds the backbone and its
        optimizer. Asynchronous unless `sync`: the step waits only for the copy to host memory."""
        st = self.state
        if st.step == self.last_saved_step:
            return
        meta = None
        if self.rank == 0:
            meta = {"epoch": st.epoch, "samples_seen": st.samples_seen, "num_classes": self.num_classes,
                    "config": self.cfg.to_dict(), "backbone_optimizer_layout": self.backbone_optimizer.layout}
        t0 = time.perf_counter()
        self.ckpt.save_states(st.step, meta, sync=sync)
        stall = time.perf_counter() - t0
        self.save_policy.saved()
        self.last_saved_step = st.step
        timing = self.ckpt.last_timing
        self.metrics.observe_checkpoint(write_s=timing.write if timing is not None and sync else stall,
                                        stall_s=stall, ok=True)

    def _preempted(self) -> bool:
        """A new preemption notice at this step (every checkpoint.preemption_poll_steps steps)."""
        poll = self.cfg.checkpoint.preemption_poll_steps
        if self.preemption_notice is None or not poll or self.state.step % poll:
            return False
        notice = self.preemption_notice()
        if notice is None or notice == self._notice_handled:
            return False
        self._notice_handled = notice
        self.metrics.mark_preemption()
        if self.rank == 0:
            log.info(f"preemption notice at step {self.state.step}: {notice}; checkpointing now, "
                     "training goes on until the node is reclaimed")
        return True

    def _checkpoint_to_report(self) -> Path | None:
        """On rank 0, the newest checkpoint once it is committed (its manifest is in place), once."""
        from fr_train.checkpointing.files import MANIFEST
        from fr_train.checkpointing.loading import step_dir_name

        if self.rank != 0 or self.last_saved_step in (-1, self._reported_step):
            return None
        path = self.ckpt.root / step_dir_name(self.last_saved_step)
        if not (path / MANIFEST).is_file():
            return None  # still being written in the background: the next report carries it
        self._reported_step = self.last_saved_step
        return path

    def _skip_to(self, epoch_samples: int) -> None:
        """Resume without the reader's own state (another world size, or a source that has none). A
        world-size-independent source seeks to the position; else the epoch restarts and its first
        ``epoch_samples`` global samples are skipped, in whole global micro-batches of micro × world."""
        seek = getattr(self.data, "seek", None)
        if seek is not None:
            try:
                seek(self.state.epoch, epoch_samples)
                return
            except ValueError:  # not a whole number of its global batches (a fixed-size run on another size)
                pass
        per_batch = self.plan.micro_batch * self.world
        self._skip_batches = epoch_samples // per_batch
        if epoch_samples % per_batch and self.rank == 0:
            log.info(f"resume: {epoch_samples} samples into epoch {self.state.epoch} is not a whole number "
                     f"of global batches of {per_batch}; skipping {self._skip_batches * per_batch} "
                     f"({epoch_samples % per_batch} samples are seen again)")
