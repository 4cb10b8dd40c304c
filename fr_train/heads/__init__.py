"""The sharded prototype head (Partial FC + combined margins + VPL) and its row-sparse optimizer."""

from __future__ import annotations

from fr_train.heads.bce_head import BCEHead
from fr_train.heads.epl_head import EPLHead
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.optim import RowSparseAdamW, RowSparseSGD
from fr_train.heads.partial_fc import PartialFC
from fr_train.heads.reshard import reshard_head_states
from fr_train.heads.unpg_head import UNPGHead
from fr_train.heads.uss_head import USSHead
from fr_train.heads.vpl import VPLConfig
from fr_train.parallel.collectives import scale_backbone_grad
from fr_train.parallel.sharding import ClassShard, class_shard

__all__ = [
    "BCEHead",
    "ClassShard",
    "CombinedMargin",
    "EPLHead",
    "PartialFC",
    "RowSparseAdamW",
    "RowSparseSGD",
    "UNPGHead",
    "USSHead",
    "VPLConfig",
    "class_shard",
    "reshard_head_states",
    "scale_backbone_grad",
]
