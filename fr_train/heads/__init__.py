"""The sharded prototype head (Partial FC + combined margins + VPL) and its row-sparse optimizer."""

from __future__ import annotations

from fr_train.heads.collectives import scale_backbone_grad
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.optim import RowSparseAdamW, RowSparseSGD
from fr_train.heads.partial_fc import PartialFC
from fr_train.heads.reshard import reshard_head_states
from fr_train.heads.sharding import ClassShard, class_shard
from fr_train.heads.vpl import VPLConfig

__all__ = [
    "ClassShard",
    "CombinedMargin",
    "PartialFC",
    "RowSparseAdamW",
    "RowSparseSGD",
    "VPLConfig",
    "class_shard",
    "reshard_head_states",
    "scale_backbone_grad",
]
