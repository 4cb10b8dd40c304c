"""The training loop of one rank: data → backbone (DeepSpeed, data-parallel) → sharded head → step.

`Trainer` knows nothing of Ray (torch.distributed already initialised, or a single process), so
tests drive it directly; cluster/worker.py is the Ray Train entry that runs it on every worker.

Gradient contract (see fr_train/heads): the head returns the GLOBAL mean loss, identical on
every rank, and back-propagates into each rank's embeddings exactly d(global loss)/d(local
embeddings). The backbone gradient of rank r is then rank r's share of the full gradient; the
shares sum to d(global loss)/dθ. DeepSpeed AVERAGES gradients over the W data-parallel ranks,
so the embeddings enter the head through `scale_backbone_grad(·, W)` (identity forward, ×W
backward, the head's own gradients untouched): after averaging, every rank holds exactly
d(global mean loss)/dθ, the same objective as one process on the whole global batch.
"""

from __future__ import annotations

import json
import math
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from fr_train.config import TrainConfig
from fr_train.heads import scale_backbone_grad
from fr_train.schedule import PolySchedule, scaled_lr
from fr_train.train import engine as eng

if TYPE_CHECKING:
    from fr_train.checkpointing import RunStart


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; raised on every rank together (the loss is the same everywhere).
    ``step`` is the step it happened at: the same step again after a restart is not a transient."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class StepTimes:
    """Wall-clock parts of one step, for the progress log and the metrics."""

    data: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.data + self.forward + self.backward + self.optimizer


class BatchSource(Protocol):
    """What the loop needs of its data: the DALI iterator, or an in-memory source in tests."""

    def __iter__(self) -> Iterator[Any]: ...  # items with .images [B,3,H,W] and .labels [B] int64
    def __len__(self) -> int: ...
    def reset(self) -> None: ...


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    epoch_samples: int = 0
    """Global samples consumed in the current epoch: the data position a resume on another world
    size (or from a source without a reader state) skips ahead to."""
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_head(cfg: TrainConfig, num_classes: int, device: torch.device, forwards_per_epoch: int) -> torch.nn.Module:
    """The head `cfg.head.loss` names. Prototype heads draw their initial rows per class block
    (the same for any world size) and seed their negative sampler from (head.seed, rank)."""
    from fr_train.heads import BCEHead, CombinedMargin, EPLHead, PartialFC, UNPGHead, USSHead, VPLConfig
    from fr_train.losses import ContrastiveLoss, TripletLoss

    h = cfg.head
    if h.loss == "triplet":
        return TripletLoss(margin=h.pair_margin, mining=h.triplet_mining)
    if h.loss == "contrastive":
        return ContrastiveLoss(margin=h.pair_margin, pos_weight=h.contrastive_pos_weight)
    margin = CombinedMargin(s=h.s, m1=h.m1, m2=h.m2, m3=h.m3, linear=h.margin == "softmax")
    common: dict[str, Any] = dict(sample_rate=h.sample_rate, seed=h.seed, storage_dtype=getattr(torch, h.storage_dtype),
                                  device=device)
    d = cfg.backbone.embedding_size
    if h.loss == "bce":
        return BCEHead(num_classes, d, margin, neg_weight=h.bce_neg_weight, bias_ratio=h.bce_bias_ratio, **common)
    if h.loss == "unpg":
        return UNPGHead(num_classes, d, margin, whisker=h.unpg_whisker, **common)
    if h.loss == "uss":
        return USSHead(num_classes, d, margin, uss_margin=h.uss_margin, uss_weight=h.uss_weight,
                       start_iter=h.uss_start_epoch * forwards_per_epoch, **common)
    if h.loss == "epl":
        return EPLHead(num_classes, d, margin, k=h.epl_k, start_iter=h.epl_start_epoch * forwards_per_epoch,
                       **common)
    vpl = VPLConfig(lambda_=h.vpl_lambda, delta_t=h.vpl_delta_t, start_iter=h.vpl_start_iter) if h.vpl else None
    return PartialFC(num_classes, d, margin, vpl=vpl, **common)


class Trainer:
    """Owns one rank's data iterator, DeepSpeed engine, sharded head and its optimizer."""

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world: int,
        device: torch.device,
        report: Callable[[dict[str, Any], Path | None], None] | None = None,
        data: BatchSource | None = None,
        job_id: str = "local",
        preemption_notice: Callable[[], str | None] | None = None,
        launch_id: str | None = None,
    ) -> None:
        """``launch_id``: the same on every start of one launch and on Ray's restarts of its workers,
        different for the next launch (train_loop: the Ray session and job). A start with the launch id
        the run directory recorded is a restart: it continues that launch's progress instead of applying
        checkpoint.resume=never or run.overwrite again. None (tests, scripts): every Trainer is a new start."""
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self._data_override = data
        # report(metrics, newly committed checkpoint directory or None), on every rank at the same steps
        self.report = report or (lambda metrics, checkpoint: None)
        self._reported_step = -1
        # Precision, memory format and input dtype: decided once, the same way on every device.
        self.format = eng.resolve_format(cfg.run.precision, cfg.run.channels_last, eng.DeviceFacts.of(device))
        self.precision = self.format.precision
        self.state = TrainState()
        self.stop_requested = False
        self.external_stop: Callable[[], bool] = lambda: False  # e.g. a deferred SIGTERM (cluster.preemption)
        self._skip_batches = 0
        # Asked on every rank at the same steps (Ray's query is a barrier); returns a description of
        # the notice, the same on all ranks, or None.
        self.preemption_notice = preemption_notice
        self._notice_handled: str | None = None
        self.run_dir = Path(cfg.run.storage).expanduser() / cfg.run.name
        self.log_path = self.run_dir / "train_log.jsonl"
        # First, before anything is built or written: may this start use the run directory? (A run name
        # owns its directory: fr_train/checkpointing/rundir.py.)
        self.start = self._claim_run_directory(launch_id)
        self._build()
        from fr_train.metrics import RunMetrics

        self.metrics = RunMetrics(cfg.metrics, cfg.run.name, job_id, rank, world, socket.gethostname(),
                                  checkpoint_interval_s=cfg.checkpoint.every_minutes * 60, device=device)
        self._setup_checkpointing()
        if rank == 0:  # only now: a resume refused (incompatible checkpoint) leaves the run's config.json alone
            (self.run_dir / "config.json").write_text(cfg.to_json())

    # ------------------------------------------------------------------ construction
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

    def _build(self) -> None:
        from data_pipeline.dali import DaliConfig, DaliFaceIterator
        from data_pipeline.dataset import open_dataset
        from fr_train.backbones import build_backbone
        from fr_train.backbones.flops import count_flops

        cfg = self.cfg
        data_dir = Path(cfg.data.path or "")
        dataset = open_dataset(data_dir)
        decode_on_gpu = self.device.type == "cuda"  # DALI `mixed` decoding where there is a GPU
        self.num_classes = dataset.num_classes
        self.image_size = dataset.image_size
        dali = DaliConfig(
            batch_size=cfg.data.batch_size,
            last_batch=cfg.data.last_batch,
            device="gpu" if decode_on_gpu else "cpu",
            device_id=self.device.index if decode_on_gpu else None,
            dtype=self.format.loader_dtype(decode_on_gpu),
            num_threads=cfg.data.num_threads,
            seed=cfg.run.seed,
            initial_fill=cfg.data.shuffle_buffer,
        )
        if self._data_override is not None:
            self.data: BatchSource = self._data_override
        elif cfg.data.sampler == "pk":
            from data_pipeline.pk_sampler import PKFaceIterator

            self.data = PKFaceIterator(data_dir, dali, k=cfg.data.pk_images_per_identity, rank=self.rank,
                                       world_size=self.world)
        else:
            self.data = DaliFaceIterator(data_dir, dali, rank=self.rank, world_size=self.world)
        self.steps_per_epoch = len(self.data) // cfg.run.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} × {self.world} ranks × run.grad_accum="
                f"{cfg.run.grad_accum} is larger than the dataset {data_dir} ({len(dataset)} images): "
                "lower data.batch_size or run.grad_accum"
            )
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch
        self.global_batch = cfg.data.batch_size * self.world * cfg.run.grad_accum
        base_lr = scaled_lr(cfg.optimizer.lr, self.global_batch, cfg.optimizer.base_batch)
        self.schedule = PolySchedule(base_lr, self.total_steps, min(cfg.schedule.warmup_steps, self.total_steps),
                                     cfg.schedule.power)

        # Identical initial backbone on every rank (DeepSpeed also broadcasts rank 0's weights).
        seed_everything(cfg.run.seed)
        if self.image_size[0] != self.image_size[1]:
            raise ValueError(f"{data_dir}/property: images are {self.image_size[0]}x{self.image_size[1]}; "
                             "the backbones take square crops (e.g. 112x112): re-pack with a square size")
        backbone = build_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size,
                                  dropout=cfg.backbone.dropout, image_size=self.image_size[0])
        self.backbone_flops = count_flops(backbone, (1, 3, *self.image_size))
        o = cfg.optimizer
        opt = eng.backbone_optimizer(backbone.parameters(), o.name, base_lr, o.momentum, o.weight_decay)
        ds_config = eng.deepspeed_config(self.format, micro_batch=cfg.data.batch_size, grad_accum=cfg.run.grad_accum,
                                         clip_grad_norm=o.clip_grad_norm, zero_stage=cfg.run.zero_stage)
        self.engine = eng.build_engine(backbone, opt, ds_config, self.device)
        self.head = build_head(cfg, self.num_classes, self.device, self.steps_per_epoch * cfg.run.grad_accum)
        # Heads without prototypes (triplet, contrastive) have nothing to optimise.
        self.head_optimizer = None if next(self.head.parameters(), None) is None else self.head.make_optimizer(
            kind=cfg.optimizer.name, lr=base_lr, momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay,
        )
        self.teacher, self.distill = self._build_distillation()
        self.data_dir = data_dir
        self.eval_sets = self._load_eval_sets(data_dir) if self.rank == 0 and cfg.eval.enabled else []

    def _build_distillation(self) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        """The frozen teacher and the distillation loss when distill.teacher is set (else None, None)."""
        d = self.cfg.distill
        if not d.teacher:
            return None, None
        from fr_train.export import load_saved_model
        from fr_train.losses import DistillLoss, DistillWeights

        teacher, info = load_saved_model(d.teacher)
        if int(info["image_size"]) != self.image_size[0]:
            raise ValueError(f"distill.teacher {d.teacher}: trained on {info['image_size']}px images, this dataset "
                             f"has {self.image_size[0]}px; distil on data of the teacher's input size")
        teacher = self.format.frozen_module(teacher.requires_grad_(False), self.device)
        loss = DistillLoss(DistillWeights(feature=d.feature_weight, ekd_pos=d.ekd_pos_weight, ekd_neg=d.ekd_neg_weight,
                                          ekd_topk=d.ekd_topk, ekd_temperature=d.ekd_temperature,
                                          ekd_momentum=d.ekd_momentum)).to(self.device)
        if self.rank == 0:
            print(f"[fr_train] distilling from {d.teacher} ({info['backbone']}, {info['embedding_size']}-d)", flush=True)
        return teacher, loss

    def _load_eval_sets(self, data_dir: Path) -> list[Any]:
        from fr_train.evaluation.runner import find_eval_sets, load_verification_set

        paths = find_eval_sets(data_dir, self.cfg.eval.sets)
        return [load_verification_set(p, self.image_size) for p in paths]

    # ------------------------------------------------------------------ the loop
    def set_lr(self, lr: float) -> None:
        for opt in (self.engine.optimizer, self.head_optimizer):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = lr

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, times: StepTimes, boundary: bool = True) -> float:
        """One micro-batch: forward, backward, and — at a gradient-accumulation boundary — the
        optimizer steps of the backbone (DeepSpeed) and the head. Times are added to `times`."""
        t0 = time.perf_counter()
        images = self.format.batch(images, self.device)  # the engine's dtype and memory format, on the device
        embeddings = self.engine(images)
        # ×W on the backbone's gradient only: DeepSpeed averages it over ranks (module docstring).
        student = scale_backbone_grad(embeddings.float(), self.world)
        loss = self.head(student, labels)
        if self.teacher is not None and self.distill is not None:
            with torch.no_grad():  # frozen, in eval mode: the same images, its own BatchNorm statistics
                target = self.teacher(images).float()
            # Global-batch mean with local gradients, like the head's loss: the same ×W contract.
            loss = loss + self.distill(student, target, labels)
        self._sync()
        t1 = time.perf_counter()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            self._observe(loss_value, times)  # so the NaN-loss alert sees it before the job stops
            self.metrics.close(clean=False)
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {self.state.step} (epoch {self.state.epoch}) of run "
                f"{self.cfg.run.name}: lower optimizer.lr (now {self.schedule.base_lr:g} after scaling), "
                "add warmup (schedule.warmup_steps) or check the data; the last checkpoint is intact",
                self.state.step,
            )
        loss_scale = eng.loss_scale(self.engine, self.format)
        # DeepSpeed divides by grad_accum here, for the head's gradients too: they accumulate as
        # the mean over micro-batches, like the backbone's.
        self.engine.backward(loss)
        self._sync()
        t2 = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        self.engine.step()  # a no-op for the weights until the accumulation boundary
        if boundary and self.head_optimizer is not None:
            if self.engine.skipped_steps == skipped_before:
                if loss_scale != 1.0:  # fp16: the head's gradients carry DeepSpeed's loss scale too
                    for p in self.head.parameters():
                        if p.grad is not None:
                            p.grad.mul_(1.0 / loss_scale)
                self.head_optimizer.step()
            self.head_optimizer.zero_grad()
        self._sync()
        t3 = time.perf_counter()
        times.forward += t1 - t0
        times.backward += t2 - t1
        times.optimizer += t3 - t2
        return loss_value

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag true on any rank → true on every rank (one small all-reduce): a SIGTERM reaches
        one worker, a time-based checkpoint falls due at slightly different moments, yet all ranks
        must stop or save at the same step."""
        if self.world == 1 or not dist.is_initialized():
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    # ------------------------------------------------------------------ checkpoints
    def _setup_checkpointing(self) -> None:
        from fr_train.checkpointing import CheckpointManager, SavePolicy, broadcast_session_token

        c = self.cfg.checkpoint
        distributed = self.world > 1 and dist.is_initialized()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        session = broadcast_session_token() if distributed else None
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", c.keep, self.rank, self.world, session=session)
        self.save_policy = SavePolicy(c.every_steps, c.every_minutes)
        self.last_saved_step = -1
        self.resumed_from: str | None = None
        self._resume()

    def _resume(self) -> None:
        """What the start decided (``self.start``, from checkpoint.resume): continue the newest loadable
        checkpoint of this run (auto), a given checkpoint directory, or nothing (never, or auto with no
        checkpoint in a fresh directory)."""
        from fr_train.checkpointing import load_checkpoint, restore_rng
        from fr_train.checkpointing.deepspeed_state import (
            LAYOUT_REPLICATED,
            load_consolidated_state,
            load_optimizer_state,
            optimizer_layout,
        )

        path = self.start.resume_path
        if path is None:
            return
        # rank 0 hashed every file of an auto-chosen checkpoint in check_run_directory: not twice
        ckpt = load_checkpoint(path, hash_files=self.rank == 0 and self.start.resume_from is None)
        ckpt.check_compatible(self.cfg.to_dict(), self.num_classes)
        payload = ckpt.payload_for(self.rank, self.world)
        shared = ckpt.shared()
        if shared is None:
            raise ValueError(f"{path}: has no backbone.pt; it is not a checkpoint of a training run")
        self.engine.module.load_state_dict(shared["backbone"])
        layout = optimizer_layout(self.engine)
        saved_layout = ckpt.meta.get("backbone_optimizer_layout", LAYOUT_REPLICATED)
        if saved_layout != layout:
            raise ValueError(f"{path}: the backbone optimizer state was saved {saved_layout}, this run's is {layout}: "
                             "resume with the run.zero_stage (0 vs 1/2) and run.precision the checkpoint was written with")
        if layout == LAYOUT_REPLICATED:
            load_optimizer_state(self.engine, shared["optimizer"])
        elif ckpt.world_size == self.world:  # this rank's own ZeRO slice: exact
            load_optimizer_state(self.engine, payload["backbone_optimizer"])
        else:  # another data-parallel size: scatter the consolidated state into this partitioning
            load_consolidated_state(self.engine, shared["optimizer_consolidated"], str(path))
        if self.distill is not None and shared.get("distill") is not None:
            self.distill.load_state_dict(shared["distill"])  # the FPR thresholds
        self.head.load_state_dict(payload["head"])
        train = payload["train"]
        self.state.step, self.state.epoch, self.state.samples_seen = train["step"], train["epoch"], train["samples_seen"]
        self.state.epoch_samples = int(train.get("epoch_samples", 0))
        data_state, load_data = payload.get("data"), getattr(self.data, "load_state_dict", None)
        if data_state is not None and load_data is not None:
            load_data(data_state)  # the exact reader position (same world size)
        else:
            self._skip_to(self.state.epoch_samples)
        if payload.get("rng") is not None:
            restore_rng(payload["rng"])
        else:  # another world size: a fresh, deterministic stream per rank; the data skips ahead (_skip_to)
            seed_everything(self.cfg.run.seed + 1_000_003 * self.state.step + self.rank)
        self.last_saved_step = self.state.step
        self.resumed_from = path
        self.metrics.mark_resume()
        if self.rank == 0:
            print(f"[fr_train] resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                  f"saved by {ckpt.world_size} rank(s), now {self.world})", flush=True)

    def save_checkpoint(self, sync: bool = False) -> None:
        """Every rank writes its shard (head, data position, RNG); rank 0 adds the backbone and its
        optimizer. Asynchronous unless `sync`: the step waits only for the copy to host memory."""
        from fr_train.checkpointing import capture_rng
        from fr_train.checkpointing.deepspeed_state import (
            LAYOUT_PARTITIONED,
            consolidated_state,
            optimizer_layout,
            portable_optimizer_state,
        )

        st = self.state
        if st.step == self.last_saved_step:
            return
        state_fn = getattr(self.data, "state_dict", None)
        payload = {"train": {"step": st.step, "epoch": st.epoch, "samples_seen": st.samples_seen,
                             "epoch_samples": st.epoch_samples},
                   "head": self.head.state_dict(), "data": state_fn() if state_fn is not None else None,
                   "rng": capture_rng()}
        # ZeRO 1/2: every rank saves its slice of the backbone optimizer; else rank 0 saves the whole.
        layout = optimizer_layout(self.engine)
        partitioned = layout == LAYOUT_PARTITIONED
        payload["backbone_optimizer"] = portable_optimizer_state(self.engine) if partitioned else None
        consolidated = consolidated_state(self.engine)  # a collective under ZeRO (every rank), else None
        shared = meta = None
        if self.rank == 0:
            shared = {"backbone": self.engine.module.state_dict(),
                      "optimizer": None if partitioned else portable_optimizer_state(self.engine),
                      "optimizer_consolidated": consolidated,  # for a resume on another world size
                      "distill": None if self.distill is None else self.distill.state_dict()}
            meta = {"epoch": st.epoch, "samples_seen": st.samples_seen, "num_classes": self.num_classes,
                    "config": self.cfg.to_dict(), "backbone_optimizer_layout": layout}
        t0 = time.perf_counter()
        save = self.ckpt.save if sync else self.ckpt.save_async
        save(st.step, payload, shared, meta, private_payload=True)
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
            print(f"[fr_train] preemption notice at step {self.state.step}: {notice}; checkpointing now, "
                  "training goes on until the node is reclaimed", flush=True)
        return True

    def _checkpoint_to_report(self) -> Path | None:
        """On rank 0, the newest checkpoint once it is committed (its manifest is in place), once."""
        from fr_train.checkpointing.files import MANIFEST
        from fr_train.checkpointing.manager import step_dir_name

        if self.rank != 0 or self.last_saved_step in (-1, self._reported_step):
            return None
        path = self.ckpt.root / step_dir_name(self.last_saved_step)
        if not (path / MANIFEST).is_file():
            return None  # still being written in the background: the next report carries it
        self._reported_step = self.last_saved_step
        return path

    def _skip_to(self, epoch_samples: int) -> None:
        """Resume without the reader's own state (another world size, or a source that has none):
        the epoch restarts and its first ``epoch_samples`` global samples are skipped, in whole
        global micro-batches of data.batch_size × world."""
        per_batch = self.cfg.data.batch_size * self.world
        self._skip_batches = epoch_samples // per_batch
        if epoch_samples % per_batch and self.rank == 0:
            print(f"[fr_train] resume: {epoch_samples} samples into epoch {self.state.epoch} is not a whole number "
                  f"of global batches of {per_batch}; skipping {self._skip_batches * per_batch} "
                  f"({epoch_samples % per_batch} samples are seen again)", flush=True)

    def _epoch_batches(self) -> Iterator[Any]:
        """This epoch's batches; the first epoch after a resume without a reader state starts where
        the checkpoint stopped (skipped batches are read and dropped: the data order stays exact)."""
        skip, self._skip_batches = self._skip_batches, 0
        it = iter(self.data)
        for _ in range(skip):
            if next(it, None) is None:
                break
        return it

    def _sync(self) -> None:
        eng.synchronize(self.device)

    def fit(self) -> TrainState:
        cfg, st = self.cfg, self.state
        self._log_start()
        progress = self._progress_bar()
        last_eval = self.evaluate()  # step 0: the accuracy training starts from
        window_start, window_images = time.perf_counter(), 0
        accum = cfg.run.grad_accum
        micro_losses: list[float] = []
        times = StepTimes()
        while st.step < self.total_steps and not self.stop_requested:
            self.engine.train()
            self.head.train()
            t_data = time.perf_counter()
            for batch in self._epoch_batches():
                if not micro_losses:
                    times = StepTimes()
                    self.set_lr(self.schedule.lr(st.step))
                times.data += time.perf_counter() - t_data
                boundary = len(micro_losses) + 1 == accum
                micro_losses.append(self.train_step(batch.images, batch.labels, times, boundary))
                t_data = time.perf_counter()
                if not boundary:
                    continue
                loss = sum(micro_losses) / len(micro_losses)
                micro_losses = []
                st.step += 1
                st.samples_seen += self.global_batch
                st.epoch_samples += self.global_batch
                window_images += self.global_batch
                self._observe(loss, times)
                if st.step % cfg.run.log_every == 0 or st.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = self._record(loss, times, window_images / max(elapsed, 1e-9))
                    window_start, window_images = time.perf_counter(), 0
                    self._emit(record, progress)
                if cfg.eval.every_steps and st.step % cfg.eval.every_steps == 0 and st.step < self.total_steps:
                    last_eval = self.evaluate()
                if self.external_stop() and not self.stop_requested:
                    self.stop_requested = True
                    print(f"[fr_train] rank {self.rank}: SIGTERM at step {st.step}: checkpointing this step on every "
                          "rank, then stopping", flush=True)
                stopping, save_due = self._agree(self.stop_requested, self.save_policy.due(st.step))
                self.stop_requested = stopping
                if not stopping and self._preempted():
                    self.save_checkpoint(sync=True)  # just in time: committed before Ray's deadline
                elif save_due and not stopping:
                    self.save_checkpoint()
                if st.step >= self.total_steps or stopping:
                    break
                t_data = time.perf_counter()
            else:
                st.epoch += 1
                st.epoch_samples = 0
                self.data.reset()
                self.save_checkpoint()  # epoch ends are checkpoints too
        if progress is not None:
            progress.close()
        if self.stop_requested and st.step < self.total_steps:
            # Preempted: checkpoint this step synchronously and leave; the resumed run finishes.
            self.save_checkpoint(sync=True)
            self.ckpt.close()
            if self.world > 1 and dist.is_initialized():
                # Rank 0 has committed once every rank is here: only now may a rank leave (under Ray,
                # the first rank to leave makes Ray kill the others, rank 0 mid-commit included).
                dist.barrier()
            self.metrics.close(clean=False)
            if self.rank == 0:
                print(f"[fr_train] stopped at step {st.step} on request; checkpoint saved, resume with "
                      f"the same --name", flush=True)
            return st
        self.ckpt.close()
        last_eval = self.evaluate()
        self._finish(last_eval)
        return st

    # ------------------------------------------------------------------ logging / eval / end
    def _observe(self, loss: float, times: StepTimes) -> None:
        step_s = max(times.total, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        injected = getattr(self.head, "last_vpl_injected", None)
        sampled = getattr(self.head, "last_sampled_classes", None)
        self.metrics.observe_step(
            step=self.state.step, epoch=self.state.epoch, loss=loss, lr=self.schedule.lr(max(self.state.step - 1, 0)),
            images_per_s_rank=self.cfg.data.batch_size / step_s, images_per_s_global=self.global_batch / step_s,
            samples_seen=self.state.samples_seen, data_s=times.data, forward_s=times.forward,
            backward_s=times.backward, optimizer_s=times.optimizer, step_s=step_s,
            grad_norm=None if grad_norm is None else float(grad_norm),
            loss_scale=eng.loss_scale(self.engine, self.format) if self.precision == "fp16" else None,
            skipped_steps=int(self.engine.skipped_steps),
            sampled_classes=None if sampled is None else sampled.numel(),
            vpl_injected_fraction=None if injected is None else float(injected),
        )

    def _record(self, loss: float, times: StepTimes, images_per_s: float) -> dict[str, Any]:
        rec = {
            "time": round(time.time(), 3),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss,  # full precision: resumed runs are compared bitwise
            "lr": self.schedule.lr(self.state.step - 1),
            "images_per_s": round(images_per_s, 2),
            "step_time_s": round(times.total, 4),
            "data_s": round(times.data, 4),
            "forward_s": round(times.forward, 4),
            "backward_s": round(times.backward, 4),
            "optimizer_s": round(times.optimizer, 4),
            "samples_seen": self.state.samples_seen,
            "peak_memory_gib": round(eng.peak_memory_bytes(self.device) / 2**30, 3),
        }
        bias = getattr(self.head, "unified_bias", None)  # BCE / USS: the learned unified threshold
        if bias is not None:
            rec["unified_threshold"] = round(float(bias.detach().sum()) / self.cfg.head.s, 6)  # on the cosine scale
        if self.distill is not None:
            rec.update({f"distill_{k}": round(v, 6) for k, v in self.distill.last_terms.items()})
        remaining = self.total_steps - self.state.step
        rec["eta_s"] = round(remaining * self.global_batch / max(images_per_s, 1e-9), 1)
        self.state.history.append(rec)
        return rec

    def _emit(self, record: dict[str, Any], progress: Any) -> None:
        if self.rank == 0:
            line = json.dumps({"event": "train", **record})
            with self.log_path.open("a") as f:
                f.write(line + "\n")
            print(f"[fr_train] step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
                  f"lr {record['lr']:.4g} {record['images_per_s']:.1f} img/s eta {record['eta_s']:.0f}s",
                  flush=True)
            if progress is not None:
                progress.update(record["step"] - progress.n)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}",
                                     ips=f"{record['images_per_s']:.0f}")
        self.report({k: v for k, v in record.items() if isinstance(v, int | float)}, self._checkpoint_to_report())

    def _progress_bar(self) -> Any:
        if self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, desc=f"fr_train {self.cfg.run.name}", unit="step",
                    mininterval=5.0, dynamic_ncols=True)

    def _log_start(self) -> None:
        if self.rank != 0:
            return
        info = {
            "event": "start", "time": round(time.time(), 3), "run": self.cfg.run.name, "world_size": self.world, "device": str(self.device),
            "precision": self.precision, "channels_last": self.format.channels_last, "num_classes": self.num_classes, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "global_batch": self.global_batch, "base_lr": self.schedule.base_lr,
            "backbone": self.cfg.backbone.name, "data_dir": str(self.data_dir),
            "backbone_gflops": round(self.backbone_flops / 1e9, 3),
            "host": socket.gethostname(),
            "run_directory": self.start.to_json(),  # resumed from, skipped checkpoints, replaced run
        }
        print(f"[fr_train] {self.cfg.backbone.name}: {info['backbone_gflops']} GFLOPs (2 × multiply-adds) forward per "
              f"{self.image_size[0]}x{self.image_size[1]} image; {self.num_classes} classes over {self.world} "
              f"rank(s); global batch {self.global_batch}; {self.total_steps} steps; {self.precision}"
              f"{', channels_last' if self.format.channels_last else ''} on {self.device.type}", flush=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(info) + "\n")

    def evaluate(self) -> dict[str, Any]:
        """Verification on rank 0 (the backbone is replicated under ZeRO 0-2); others wait."""
        results: dict[str, Any] = {}
        if self.rank == 0 and self.eval_sets:
            from fr_train.evaluation.runner import evaluate_verification

            model = self.engine.module
            was_training = model.training
            model.eval()
            for vs in self.eval_sets:
                r = evaluate_verification(model, vs, batch_size=self.cfg.eval.batch_size, device=self.device)
                results[vs.name] = r
                self.metrics.observe_eval(vs.name, r["accuracy"], {
                    float(k.removeprefix("tar_at_far_")): v for k, v in r.items() if k.startswith("tar_at_far_")})
                line = {"event": "eval", "time": round(time.time(), 3), "step": self.state.step, "set": vs.name, **r}
                with self.log_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                print(f"[fr_train] eval step {self.state.step} {vs.name}: accuracy {r['accuracy']:.4f} "
                      f"± {r['accuracy_std']:.4f}, TAR@FAR=1e-3 {r['tar_at_far_1e-3']:.4f}", flush=True)
            model.train(was_training)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return results

    def _finish(self, last_eval: dict[str, Any]) -> None:
        if self.rank == 0:
            from fr_train.export import export_onnx, save_backbone, write_model_info

            out = self.run_dir / "final"
            out.mkdir(parents=True, exist_ok=True)
            model = self.engine.module.float().eval()
            save_backbone(model, out / "backbone.safetensors")
            (out / "config.json").write_text(self.cfg.to_json())
            write_model_info(out, backbone=self.cfg.backbone.name, embedding_size=self.cfg.backbone.embedding_size,
                             image_size=self.image_size[0], steps=self.state.step)
            if self.cfg.run.export_onnx:
                export_onnx(model.cpu(), out / "backbone.onnx", image_size=self.image_size[0])
            summary = {"event": "end", "step": self.state.step, "eval": last_eval, "final_dir": str(out)}
            with self.log_path.open("a") as f:
                f.write(json.dumps(summary) + "\n")
            print(f"[fr_train] done: {self.state.step} steps; model in {out}", flush=True)
        flat = {f"eval/{name}/{k}": v for name, r in last_eval.items() for k, v in r.items()
                if isinstance(v, int | float)}
        self.report({"step": self.state.step, "done": 1, **flat}, self._checkpoint_to_report())
        self.metrics.close(clean=True)
