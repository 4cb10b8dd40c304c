"""The ranges and cross-field rules of a TrainConfig: every message names the key, the bad value
and what is valid. Called by fr_train.config once a tree is complete (defaults, preset, file,
overrides), so a run never starts on a value it would fail on late (or silently ignore)."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import typing
from pathlib import Path
from typing import Any

from fr_train.config import METHODS, ConfigError, TrainConfig

_NOTHING = object()


def _check(cond: bool, key: str, msg: str, got: Any = _NOTHING) -> None:
    """Raise ConfigError "key: msg (got value)" unless ``cond``; ``got`` names the bad value."""
    if not cond:
        raise ConfigError(f"{key}: {msg}" + ("" if got is _NOTHING else f" (got {got!r})"))


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float of the tree must be a finite number. WHY one rule for all: TOML and `--set` accept
    inf and nan, and comparisons with nan are always False, so range checks like `lr > 0` would let
    nan through (and inf passes them), to fail much later as a nan loss or a check that never fires."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif hints[f.name] is float:
            _check(isinstance(value, (int, float)) and math.isfinite(value), f"{prefix}{f.name}",
                   "must be a finite number", got=value)


def _check_run_name(name: str) -> None:
    """The run directory is run.storage/run.name: a name with a path separator, '..' or an absolute
    path would put (and later prune) checkpoints outside run.storage."""
    plain = name not in (".", "..") and not any(c in name for c in ("/", "\\", "\0"))
    _check(plain, "run.name", "must be a plain directory name (no '/', '\\' or '..'): the run directory is "
           "run.storage/run.name and must stay inside run.storage", got=name)


def _check_resume(value: str) -> None:
    """auto, never, or a checkpoint directory that exists now: a typo would otherwise be found only
    by the workers, after the cluster is up (or, for a name like 'Auto', read as a path)."""
    if value in ("auto", "never"):
        return
    _check(bool(value) and Path(value).is_dir(), "checkpoint.resume",
           "is neither auto, never nor an existing checkpoint directory; pass auto (continue the run of the "
           "same run.name from its newest valid checkpoint), never (start fresh) or a checkpoint directory "
           "STORAGE/RUN/checkpoints/step_N", got=value)


def _check_ip(value: str) -> None:
    """The metrics server binds this address; a host name or typo would fail only when a worker starts."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        _check(False, "metrics.bind", "must be an IP address such as 127.0.0.1 (this host only), 0.0.0.0 "
               "(all IPv4 interfaces) or :: (all IPv6 interfaces)", got=value)


def _check_elastic(cfg: TrainConfig) -> None:
    r = cfg.run
    _check(r.min_workers >= 0, "run.min_workers", "must be >= 0 (0: a fixed size of run.num_workers)")
    _check(r.resize_interval_s > 0, "run.resize_interval_s", "must be > 0 seconds")
    _check(cfg.metrics.below_max_alert_minutes > 0, "metrics.below_max_alert_minutes", "must be > 0")
    if r.min_workers == 0:
        return
    _check(r.num_workers > 0, "run.min_workers",
           "needs an explicit run.num_workers (--num-workers), the largest size of the elastic run")
    _check(r.min_workers <= r.num_workers, "run.min_workers", f"must be <= run.num_workers ({r.num_workers})",
           got=r.min_workers)
    if r.min_workers < r.num_workers:
        _check(cfg.data.sampler in ("global", "pk"), "data.sampler",
               "must be global or pk in an elastic run (run.min_workers < run.num_workers): the shuffle reader's "
               "batches depend on the number of workers; pass --set data.sampler=global", got=cfg.data.sampler)
        from fr_train.train.batch_plan import check_elastic_range

        try:
            check_elastic_range(cfg)
        except ValueError as exc:
            raise ConfigError(f"run.min_workers: {exc}") from None


def _check_synthetic(cfg: TrainConfig) -> None:
    """The synthetic default: first what training needs of it (these rules are about the model and the
    evaluation, not the generator), then the generator's own rules, stated once in
    data_pipeline.synthetic.SyntheticConfig.problems and reported here under their config keys."""
    s = cfg.data.synthetic
    _check(s.num_identities >= 2, "data.synthetic.num_identities", "must be >= 2")
    _check(s.image_size >= 32 and s.image_size % 16 == 0,
           "data.synthetic.image_size", "must be a multiple of 16 and >= 32 (standard: 112)")
    _check(s.images_per_identity >= 2, "data.synthetic.images_per_identity", "must be >= 2")
    _check(s.num_pairs >= 10, "data.synthetic.num_pairs",
           "must be even (half genuine, half impostor) and >= 10 (the 10-fold verification protocol)",
           got=s.num_pairs)
    for name, msg, value in s.problems():
        _check(False, f"data.synthetic.{name}", msg, got=value)


def _check_compact_head(cfg: TrainConfig) -> None:
    """The compact head state (heads/compact.py) exists for what it was built and tested on: fp8 SGD
    momentum of the margin-softmax head, fp8 VPL bank of a VPL head. Anywhere else the key would be
    ignored or untested, so it is refused rather than silently changing nothing (or something)."""
    h = cfg.head
    if h.momentum_dtype == "float8_e4m3fn":
        _check(cfg.optimizer.name == "sgd", "head.momentum_dtype",
               "float8_e4m3fn needs optimizer.name=sgd (AdamW's second moment spans too many decades for one "
               "scale per row); set head.momentum_dtype=storage or optimizer.name=sgd", got=h.momentum_dtype)
        _check(cfg.optimizer.momentum > 0, "head.momentum_dtype",
               "float8_e4m3fn stores SGD momentum, but optimizer.momentum is 0; set head.momentum_dtype=storage",
               got=h.momentum_dtype)
        _check(h.loss == "margin_softmax", "head.momentum_dtype",
               f"float8_e4m3fn is built for head.loss=margin_softmax, not {h.loss}; set head.momentum_dtype=storage",
               got=h.momentum_dtype)
    if h.vpl_memory_dtype == "float8_e4m3fn":
        _check(h.vpl, "head.vpl_memory_dtype",
               "float8_e4m3fn sets the VPL memory bank's dtype but head.vpl is false; set head.vpl=true (or the "
               "vpl method) or head.vpl_memory_dtype=storage", got=h.vpl_memory_dtype)


def validate(cfg: TrainConfig) -> None:
    """Ranges and cross-field rules; every message names the key and the valid range."""
    from fr_train.backbones import BACKBONES  # local: backbones import torch

    _check_finite(cfg)
    _check(cfg.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
    _check(cfg.backbone.name in BACKBONES, "backbone.name", f"must be one of {', '.join(BACKBONES)}")
    _check(cfg.backbone.embedding_size > 0, "backbone.embedding_size", "must be > 0")
    _check(0.0 <= cfg.backbone.dropout < 1.0, "backbone.dropout", "must be in [0, 1)")
    _check(cfg.data.batch_size > 0, "data.batch_size", "must be > 0")
    _check(cfg.data.path is None or cfg.data.path.strip() != "", "data.path",
           "is empty: pass a dataset directory, or leave --data out (or data.path=none) for the synthetic default")
    # Every backbone normalises with BatchNorm, which in training needs two samples per channel (torch:
    # "Expected more than 1 value per channel when training"), unless it runs on its running statistics.
    _check(cfg.data.batch_size >= 2 or cfg.backbone.freeze_bn, "data.batch_size",
           "must be >= 2 images per rank: BatchNorm has no batch statistics of one image; or set "
           "backbone.freeze_bn=true (BatchNorm on its running statistics)", cfg.data.batch_size)
    _check(cfg.data.num_threads > 0, "data.num_threads", "must be > 0")
    _check(cfg.data.pk_images_per_identity >= 2, "data.pk_images_per_identity", "must be >= 2 (a positive pair)")
    _check(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _check_synthetic(cfg)
    _check(0.0 < cfg.head.sample_rate <= 1.0, "head.sample_rate", "must be in (0, 1]")
    _check(cfg.head.s > 0, "head.s", "must be > 0", got=cfg.head.s)
    _check(cfg.head.m1 >= 1.0, "head.m1", "must be >= 1 (1 = no multiplicative margin)")
    _check(0.0 <= cfg.head.m2 < 3.14159, "head.m2", "must be in [0, π)")
    _check(0.0 <= cfg.head.m3 < 1.0, "head.m3", "must be in [0, 1)")
    _check(0.0 <= cfg.head.vpl_lambda <= 1.0, "head.vpl_lambda", "must be in [0, 1]")
    _check(cfg.head.vpl_delta_t >= 0, "head.vpl_delta_t", "must be >= 0")
    _check(cfg.head.vpl_start_iter >= 0, "head.vpl_start_iter", "must be >= 0")
    _check(not (cfg.head.vpl and cfg.head.margin == "softmax"), "head.vpl",
           "VPL needs a normalised (margin) head, not plain softmax")
    _check(not (cfg.head.vpl and cfg.head.loss != "margin_softmax"), "head.vpl",
           f"VPL works with head.loss=margin_softmax, not {cfg.head.loss}")
    _check(not (cfg.head.loss in ("bce", "unpg", "uss", "epl") and cfg.head.margin == "softmax"), "head.margin",
           f"head.loss={cfg.head.loss} needs a normalised margin (cosface, arcface, ...), not softmax")
    _check_compact_head(cfg)
    _check(cfg.head.bce_bias_ratio > 0, "head.bce_bias_ratio", "must be > 0")
    _check(cfg.head.unpg_whisker >= 0, "head.unpg_whisker", "must be >= 0")
    _check(cfg.head.uss_start_epoch >= 0 and cfg.head.epl_start_epoch >= 0, "head.uss_start_epoch/epl_start_epoch",
           "must be >= 0")
    _check(cfg.head.pair_margin >= 0, "head.pair_margin", "must be >= 0")
    _check(cfg.optimizer.lr > 0, "optimizer.lr", "must be > 0", got=cfg.optimizer.lr)
    _check(cfg.optimizer.base_batch > 0, "optimizer.base_batch", "must be > 0")
    _check(0.0 <= cfg.optimizer.momentum < 1.0, "optimizer.momentum", "must be in [0, 1)")
    _check(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0", got=cfg.optimizer.weight_decay)
    _check(cfg.optimizer.clip_grad_norm >= 0, "optimizer.clip_grad_norm", "must be >= 0 (0 disables)")
    _check(cfg.schedule.epochs > 0, "schedule.epochs", "must be > 0")
    _check(cfg.schedule.max_steps >= 0, "schedule.max_steps", "must be >= 0 (0: run all epochs)")
    _check(cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    _check(cfg.schedule.power >= 0, "schedule.power", "must be >= 0")
    _check(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0")
    _check(cfg.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(cfg.eval.ijb_target in ("", "IJBB", "IJBC"), "eval.ijb_target", "must be IJBB, IJBC or empty (autodetect)",
           got=cfg.eval.ijb_target)
    _check(cfg.run.num_workers >= 0, "run.num_workers", "must be >= 0 (0: automatic)")
    _check(cfg.run.zero_stage in (0, 1, 2), "run.zero_stage", "must be 0, 1 or 2 (the head is model-parallel)")
    _check(cfg.run.grad_accum >= 1, "run.grad_accum", "must be >= 1")
    _check_elastic(cfg)
    _check(cfg.run.log_every >= 1, "run.log_every", "must be >= 1")
    _check(cfg.checkpoint.preemption_poll_steps >= 0, "checkpoint.preemption_poll_steps", "must be >= 0")
    _check(cfg.checkpoint.sigterm_grace_s > 0, "checkpoint.sigterm_grace_s", "must be > 0")
    _check(cfg.run.max_failures >= 0, "run.max_failures", "must be >= 0")
    _check(cfg.run.cpus_per_worker >= 1, "run.cpus_per_worker", "must be >= 1")
    _check(cfg.run.placement_timeout_s >= 0, "run.placement_timeout_s", "must be >= 0 seconds")
    _check(cfg.metrics.push_interval > 0, "metrics.push_interval", "must be > 0")
    _check(0 <= cfg.metrics.port < 65536, "metrics.port", "must be a port number (0: off)")
    _check_ip(cfg.metrics.bind)
    d = cfg.distill
    distilling = d.feature_weight > 0 or d.ekd_pos_weight > 0 or d.ekd_neg_weight > 0
    _check(min(d.feature_weight, d.ekd_pos_weight, d.ekd_neg_weight) >= 0, "distill.*_weight", "must be >= 0")
    _check(bool(d.teacher) or not distilling, "distill.teacher",
           "is required by the distillation weights: set it to a trained fr_train model (RUN/final)")
    _check(distilling or not d.teacher, "distill.teacher",
           "is set but every distillation weight is 0: set distill.ekd_pos_weight/ekd_neg_weight/feature_weight")
    _check(d.ekd_topk >= 1 and d.ekd_temperature > 0 and 0 < d.ekd_momentum <= 1,
           "distill.ekd_topk/ekd_temperature/ekd_momentum", "need topk >= 1, temperature > 0, momentum in (0, 1]")
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: off)")
    _check(cfg.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0 (0: off)",
           got=cfg.checkpoint.every_minutes)
    _check_resume(cfg.checkpoint.resume)
    _check(not cfg.run.overwrite or cfg.checkpoint.resume == "never", "run.overwrite",
           "true starts a new run in place of the old one, so it needs checkpoint.resume=never (--resume never); "
           f"checkpoint.resume={cfg.checkpoint.resume} would continue one: drop run.overwrite to continue")
    _check_run_name(cfg.run.name)
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
