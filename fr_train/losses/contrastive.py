"""Contrastive (pair) loss over the GLOBAL batch (all ranks), on cosine similarities.

Hadsell, Chopra & LeCun 2006 (eq. 4), as used for faces by DeepID2 and compared in UNPG (seed 001):
positive pairs are pulled together, negative pairs pushed beyond a margin. On L2-normalised
embeddings with ``c = cos(x_i, x_j)``:
``ℓ_ij = (1 − c)²`` if ``y_i = y_j``, else ``max(0, c − m)²``,
and the loss is the mean over all pairs ``i ≠ j`` of the global batch (each unordered pair is met
once from each side, which leaves the mean unchanged). With a P×K batch of size B the positive
fraction of pairs is ``(K − 1)/(B − 1)``; ``pos_weight`` rescales the positive terms if needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fr_train.parallel.global_batch import gather_global_batch, sum_over_ranks
from fr_train.parallel.sharding import resolve_group


class ContrastiveLoss(nn.Module):
    """``forward(embeddings [b_local, D], labels [b_local])`` → global-batch mean pair loss, identical on
    every rank; ``backward`` gives each rank exactly ``dL/d(its embeddings)``."""

    def __init__(self, margin: float = 0.3, pos_weight: float = 1.0, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not -1.0 <= margin < 1.0:
            raise ValueError(f"ContrastiveLoss margin m (a cosine) must be in [-1, 1), got {margin}")
        if not pos_weight > 0.0:
            raise ValueError(f"ContrastiveLoss pos_weight must be > 0, got {pos_weight}")
        self.margin, self.pos_weight = float(margin), float(pos_weight)
        self.comm = resolve_group(group)

    def step_stats(self) -> dict[str, float]:
        """The trainer's head interface: a pair loss has no prototypes to report on."""
        return {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gb = gather_global_batch(self.comm, embeddings, labels, "ContrastiveLoss.forward")
        cos = gb.x[gb.local] @ gb.x.t()  # this rank's anchors against the global batch
        same = gb.labels[gb.local].unsqueeze(1) == gb.labels.unsqueeze(0)
        not_self = torch.ones_like(same)
        rows = torch.arange(cos.shape[0], device=cos.device)
        not_self[rows, rows + gb.start] = False
        # Hadsell eq. 4 with the cosine distance: (1 − c)² on positives, max(0, c − m)² on negatives.
        terms = torch.where(same, self.pos_weight * (1.0 - cos).square(), torch.relu(cos - self.margin).square())
        local = (terms * not_self).sum() + 0.0 * gb.x.sum()  # 0·x keeps the graph on an empty rank
        batch = sum(gb.sizes)
        pairs = batch * (batch - 1)
        return sum_over_ranks(self.comm, local) / max(pairs, 1)
