"""The parts a Trainer is built from, each from the config: the head (or pair loss) that
``head.loss`` names, the distillation teacher and loss, the verification sets."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fr_train.config import TrainConfig
from fr_train.console import log
from fr_train.train.engine import EngineFormat


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
    # head.momentum_dtype / head.vpl_memory_dtype: "storage" keeps the storage dtype; float8 rows with
    # a per-row scale make the state ~2,060 B per class with VPL (fr_train/heads/compact.py)
    compact = {"storage": None, "float8_e4m3fn": torch.float8_e4m3fn}
    return PartialFC(num_classes, d, margin, vpl=vpl, momentum_dtype=compact[h.momentum_dtype],
                     memory_dtype=compact[h.vpl_memory_dtype], **common)


def build_distillation(cfg: TrainConfig, image_size: int, fmt: EngineFormat, device: torch.device,
                       rank: int) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """The frozen teacher and the distillation loss when distill.teacher is set (else None, None)."""
    d = cfg.distill
    if not d.teacher:
        return None, None
    from fr_train.export import load_saved_model
    from fr_train.losses import DistillLoss, DistillWeights

    teacher, info = load_saved_model(d.teacher)
    if int(info["image_size"]) != image_size:
        raise ValueError(f"distill.teacher {d.teacher}: trained on {info['image_size']}px images, this dataset "
                         f"has {image_size}px; distil on data of the teacher's input size")
    teacher = fmt.frozen_module(teacher.requires_grad_(False), device)
    loss = DistillLoss(DistillWeights(feature=d.feature_weight, ekd_pos=d.ekd_pos_weight, ekd_neg=d.ekd_neg_weight,
                                      ekd_topk=d.ekd_topk, ekd_temperature=d.ekd_temperature,
                                      ekd_momentum=d.ekd_momentum)).to(device)
    if rank == 0:
        log.info(f"distilling from {d.teacher} ({info['backbone']}, {info['embedding_size']}-d)")
    return teacher, loss


def find_ijb_release(cfg: TrainConfig) -> Any:
    """eval.ijb's release, located and its layout checked before training (a misplaced meta file should
    fail the launch, not the end of a day-long run); None when eval.ijb is empty."""
    if not cfg.eval.ijb:
        return None
    from fr_train.evaluation.ijb_layout import find_release

    return find_release(Path(cfg.eval.ijb).expanduser(), cfg.eval.ijb_target or None)


def load_eval_sets(cfg: TrainConfig, data_dir: Path, image_size: tuple[int, int]) -> list[Any]:
    from fr_train.evaluation.runner import find_eval_sets, load_verification_set

    return [load_verification_set(p, image_size) for p in find_eval_sets(data_dir, cfg.eval.sets)]
