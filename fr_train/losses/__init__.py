"""Sample-to-sample losses over the global batch (triplet, contrastive, distillation); the BCE and
UNPG heads live in fr_train/heads because they need the sharded prototypes."""

from __future__ import annotations

from fr_train.losses.contrastive import ContrastiveLoss
from fr_train.losses.distill import DistillLoss, DistillWeights
from fr_train.losses.triplet import TripletLoss

__all__ = ["ContrastiveLoss", "DistillLoss", "DistillWeights", "TripletLoss"]
