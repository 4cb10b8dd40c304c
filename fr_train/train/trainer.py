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

import math
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fr_train.config import TrainConfig
from fr_train.console import log, setup_console
from fr_train.parallel.collectives import scale_backbone_grad
from fr_train.train import engine as eng
from fr_train.train.batch_plan import empty_epoch_error, is_elastic, plan_batches
from fr_train.train.checkpoints import CheckpointingMixin
from fr_train.train.components import (
    build_distillation,
    build_head,
    find_ijb_release,
    load_eval_sets,
    seed_everything,
)
from fr_train.train.records import LOG_NAME, RecordsMixin
from fr_train.train.schedule import PolySchedule, scaled_lr
from fr_train.train.state import BatchSource, StepTimes, TrainState
from fr_train.train.tensorboard_sink import TensorBoardSink


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; raised on every rank together (the loss is the same everywhere).
    ``step`` is the step it happened at: the same step again after a restart is not a transient."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step

    def __reduce__(self) -> tuple[type[NonFiniteLossError], tuple[str, int]]:
        # Ray pickles a worker's exception to its controller: rebuild it with the step too.
        return type(self), (str(self), self.step)


class Trainer(CheckpointingMixin, RecordsMixin):
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
        setup_console()
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
        # Why to stop now, from outside (a deferred SIGTERM, the driver's Ctrl-C: cluster/), else None.
        self.external_stop: Callable[[], str | None] = lambda: None
        self._skip_batches = 0
        # Asked on every rank at the same steps (Ray's query is a barrier); returns a description of
        # the notice, the same on all ranks, or None.
        self.preemption_notice = preemption_notice
        self._notice_handled: str | None = None
        self.run_dir = Path(cfg.run.storage).expanduser() / cfg.run.name
        self.log_path = self.run_dir / LOG_NAME
        self.tensorboard = TensorBoardSink(self.run_dir, cfg.to_json()) if rank == 0 and cfg.metrics.tensorboard else None
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
    def _build(self) -> None:
        from data_pipeline.dali import DaliConfig, DaliFaceIterator
        from data_pipeline.dataset import open_dataset
        from fr_train.backbones import build_backbone, square_side
        from fr_train.backbones.flops import count_flops
        from fr_train.backbones.norm import freeze_batch_norm

        cfg = self.cfg
        # Images per worker and micro-batches per step at this world size (elastic: the same global batch).
        self.plan = plan_batches(cfg, self.world)
        data_dir = Path(cfg.data.path or "")
        dataset = open_dataset(data_dir)
        decode_on_gpu = self.device.type == "cuda"  # DALI `mixed` decoding where there is a GPU
        self.num_classes = dataset.num_classes
        self.image_size = dataset.image_size
        dali = DaliConfig(
            batch_size=self.plan.micro_batch,
            last_batch=cfg.data.last_batch,
            device="gpu" if decode_on_gpu else "cpu",
            device_id=self.device.index if decode_on_gpu else None,
            dtype=self.format.loader_dtype(decode_on_gpu),
            num_threads=cfg.data.num_threads,
            seed=cfg.run.seed,
            initial_fill=cfg.data.shuffle_buffer,
        )
        # The scheduled samplers cut one global batch per optimizer step into the step's micro-batches in an
        # elastic run (the same images per step at every size); a fixed-size run keeps one schedule batch
        # per micro-batch, as before.
        micro = self.plan.grad_accum if is_elastic(cfg.run) else 1
        if self._data_override is not None:
            self.data: BatchSource = self._data_override
        elif cfg.data.sampler == "pk":
            from data_pipeline.pk_sampler import PKFaceIterator

            self.data = PKFaceIterator(data_dir, dali, k=cfg.data.pk_images_per_identity, rank=self.rank,
                                       world_size=self.world, micro_batches=micro)
        elif cfg.data.sampler == "global":
            from data_pipeline.scheduled import ScheduledFaceIterator

            self.data = ScheduledFaceIterator(data_dir, dali, rank=self.rank, world_size=self.world,
                                              micro_batches=micro)
        else:
            self.data = DaliFaceIterator(data_dir, dali, rank=self.rank, world_size=self.world)
        self.steps_per_epoch = len(self.data) // self.plan.grad_accum
        if self.steps_per_epoch == 0:
            raise empty_epoch_error(self.plan, len(dataset), data_dir) or ValueError(
                f"an epoch of {data_dir} ({len(dataset)} images) holds no step of this sampler "
                f"(data.sampler={cfg.data.sampler}): lower data.batch_size or run.grad_accum")
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch
        self.global_batch = self.plan.global_batch
        base_lr = scaled_lr(cfg.optimizer.lr, self.global_batch, cfg.optimizer.base_batch)
        self.schedule = PolySchedule(base_lr, self.total_steps, min(cfg.schedule.warmup_steps, self.total_steps),
                                     cfg.schedule.power)

        # Identical initial backbone on every rank (DeepSpeed also broadcasts rank 0's weights).
        seed_everything(cfg.run.seed)
        backbone = build_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size,
                                  dropout=cfg.backbone.dropout,
                                  image_size=square_side(self.image_size, data_dir / "property"))
        if cfg.backbone.freeze_bn:
            freeze_batch_norm(backbone)
        self.backbone_flops = count_flops(backbone, (1, 3, *self.image_size))
        o = cfg.optimizer
        opt = eng.backbone_optimizer(backbone.parameters(), o.name, base_lr, o.momentum, o.weight_decay)
        ds_config = eng.deepspeed_config(self.format, micro_batch=self.plan.micro_batch, grad_accum=self.plan.grad_accum,
                                         clip_grad_norm=o.clip_grad_norm, zero_stage=cfg.run.zero_stage)
        self.engine = eng.build_engine(backbone, opt, ds_config, self.device,
                                       show_prints=cfg.run.ray_log_level in ("DEBUG", "INFO"))
        # At ZeRO 0 fr_train clips (one foreach norm), else DeepSpeed does (engine.clips_outside_deepspeed).
        self.clip_norm = o.clip_grad_norm if eng.clips_outside_deepspeed(self.format, cfg.run.zero_stage) else 0.0
        self.grad_norm: torch.Tensor | float | None = None  # the last step's, before clipping
        self.head = build_head(cfg, self.num_classes, self.device, self.steps_per_epoch * self.plan.grad_accum)
        # Heads without prototypes (triplet, contrastive) have nothing to optimise.
        self.head_optimizer = None if next(self.head.parameters(), None) is None else self.head.make_optimizer(
            kind=cfg.optimizer.name, lr=base_lr, momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay,
        )
        self.teacher, self.distill = build_distillation(cfg, self.image_size[0], self.format, self.device, self.rank)
        self.data_dir = data_dir
        self.eval_sets = load_eval_sets(cfg, data_dir, self.image_size) if self.rank == 0 and cfg.eval.enabled else []
        self.ijb_release = find_ijb_release(cfg) if self.rank == 0 else None

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
        if boundary and self.clip_norm > 0:  # the optimizer part: the gradients are all-reduced by now
            self.grad_norm = eng.clip_gradients(self.engine.module, self.clip_norm)
        skipped_before = self.engine.skipped_steps
        self.engine.step()  # a no-op for the weights until the accumulation boundary
        if boundary and not self.clip_norm:
            self.grad_norm = self.engine.get_global_grad_norm()  # DeepSpeed's, where it clips
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
        accum = self.plan.grad_accum
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
                reason = None if self.stop_requested else self.external_stop()
                if reason:
                    self.stop_requested = True
                    log.info(f"rank {self.rank}: {reason} at step {st.step}: checkpointing this step on every "
                             "rank, then stopping")
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
                log.info(f"stopped at step {st.step} on request; checkpoint saved, resume with "
                         f"the same --name")
            return st
        self.ckpt.close()
        last_eval = self.evaluate()
        self._finish(last_eval)
        return st

    # ------------------------------------------------------------------ logging / eval / end
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
                self._write_event({"event": "eval", "time": round(time.time(), 3), "step": self.state.step,
                                   "set": vs.name, **r})
                log.info(f"eval step {self.state.step} {vs.name}: accuracy {r['accuracy']:.4f} "
                         f"± {r['accuracy_std']:.4f}, TAR@FAR=1e-3 {r['tar_at_far_1e-3']:.4f}")
            model.train(was_training)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return results

    def _evaluate_ijb(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """eval.ijb: the final model (float32, as saved) scored by fr_eval's IJB protocol on rank 0."""
        from fr_train.evaluation.embedders import TorchEmbedder
        from fr_train.evaluation.ijb import IJBOptions, evaluate_ijb

        release = self.ijb_release
        embedder = TorchEmbedder(model, self.device, self.image_size[0], name="final")
        try:
            records = evaluate_ijb(embedder, release.root, release.target,
                                   IJBOptions(batch_size=self.cfg.eval.batch_size, progress=False))
        except (OSError, ValueError) as e:  # DataFormatError is a ValueError
            # The layout was checked at start; what is left (an image that does not decode, a file
            # removed since) must not turn a finished run into a failed one: final/ is saved, the
            # error is recorded, and `fr_eval final/ --ijb DIR` can score it once the release is fixed.
            error = f"{type(e).__name__}: " + " ".join(str(e).split())
            log.error(f"IJB evaluation of the final model failed: {error}")
            self._write_event({"event": "ijb_error", "time": round(time.time(), 3), "step": self.state.step,
                               "error": error})
            return []
        for r in records:
            self.metrics.observe_ijb(r)
            self._write_event({"event": "ijb", "time": round(time.time(), 3), "step": self.state.step, **r})
            log.info(f"IJB {r['set']} {r['protocol']}: " + (
                "TAR@FAR=1e-4 {:.4f}, 1e-3 {:.4f}".format(r["tar_at_far"]["0.0001"], r["tar_at_far"]["0.001"])
                if r["protocol"] == "1:1" else f"rank-1 {r['rank1']:.4f}, rank-5 {r['rank5']:.4f}"))
        return records

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
            ijb = self._evaluate_ijb(model) if self.ijb_release is not None else []
            if self.cfg.run.export_onnx:
                export_onnx(model.cpu(), out / "backbone.onnx", image_size=self.image_size[0])
            self._write_event({"event": "end", "step": self.state.step, "eval": last_eval, "final_dir": str(out),
                               **({"ijb": ijb} if ijb else {})})
            # At debug level: the driver prints the run's summary from the log (one summary, not two).
            log.debug(f"done: {self.state.step} steps; model in {out}")
        flat = {f"eval/{name}/{k}": v for name, r in last_eval.items() for k, v in r.items()
                if isinstance(v, int | float)}
        self.report({"step": self.state.step, "done": 1, **flat}, self._checkpoint_to_report())
        self.metrics.close(clean=True)
