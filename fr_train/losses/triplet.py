"""Triplet loss with online hard mining over the GLOBAL batch (all ranks).

FaceNet (Schroff et al. 2015, seeds 002/004, eq. 1): on L2-normalised embeddings with
``d(a, b) = ‖f(a) − f(b)‖² = 2 − 2·cos(a, b)``, a triplet (anchor a, positive p, negative n) costs
``max(d(a, p) − d(a, n) + α, 0)``. Triplets are mined in the batch:

* ``batch_hard`` (Hermans et al. 2017, "In Defense of the Triplet Loss"; seed 002's argmax/argmin):
  per anchor the hardest positive ``argmax_p d(a, p)`` and the hardest negative ``argmin_n d(a, n)``;
  the loss is the mean over VALID anchors.
* ``semi_hard`` (FaceNet §3.2): per positive pair (a, p) the closest negative that is still farther
  than the positive, ``argmin {d(a, n) : d(a, n) > d(a, p)}``; where no such negative exists, the
  farthest negative (TensorFlow Addons' ``triplet_semihard_loss`` rule). Mean over valid pairs.

Valid: an anchor needs at least one other sample of its identity AND one of another identity in
the global batch; anchors without are EXCLUDED from the mean (they define no triplet), and their
number is reported in ``last_valid``. A batch with no valid anchor at all gives a loss of 0 that
still back-propagates (zeros). Mining over the gathered batch means a P×K sampler (P identities, K
images each, K ≥ 2, spread over ranks in any way) makes every anchor valid.
Mining is done on detached distances; the gradient flows through the selected distances only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from fr_train.parallel.global_batch import count_over_ranks, gather_global_batch, sum_over_ranks
from fr_train.parallel.sharding import resolve_group

Mining = Literal["batch_hard", "semi_hard"]


class TripletLoss(nn.Module):
    """``forward(embeddings [b_local, D], labels [b_local])`` → global-batch triplet loss, identical on
    every rank; ``backward`` gives each rank exactly ``dL/d(its embeddings)`` (module docstring)."""

    def __init__(self, margin: float = 0.2, mining: Mining = "batch_hard",
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not margin >= 0.0:
            raise ValueError(f"TripletLoss margin α must be >= 0, got {margin}")
        if mining not in ("batch_hard", "semi_hard"):
            raise ValueError(f"TripletLoss mining must be 'batch_hard' or 'semi_hard', got {mining!r}")
        self.margin, self.mining = float(margin), mining
        self.comm = resolve_group(group)
        self.last_valid: int | None = None
        """Global number of anchors (batch_hard) or positive pairs (semi_hard) in the last mean."""

    def step_stats(self) -> dict[str, float]:
        """The trainer's head interface: a pair loss has no prototypes to report on."""
        return {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gb = gather_global_batch(self.comm, embeddings, labels, "TripletLoss.forward")
        anchors, y_a = gb.x[gb.local], gb.labels[gb.local]
        dist_sq = 2.0 - 2.0 * anchors @ gb.x.t()  # FaceNet eq. 1 on unit vectors: ‖a − b‖² = 2 − 2·cos
        same = y_a.unsqueeze(1) == gb.labels.unsqueeze(0)
        not_self = torch.ones_like(same)
        rows = torch.arange(anchors.shape[0], device=same.device)
        not_self[rows, rows + gb.start] = False
        pos, neg = same & not_self, ~same
        if self.mining == "batch_hard":
            terms = self._batch_hard(dist_sq, pos, neg)
        else:
            terms = self._semi_hard(dist_sq, pos, neg)
        total = sum_over_ranks(self.comm, terms.sum() + 0.0 * gb.x.sum())  # 0·x keeps the graph when empty
        count = count_over_ranks(self.comm, torch.tensor(terms.numel(), dtype=torch.int64, device=total.device))
        self.last_valid = int(count)
        return total / count.clamp_min(1).to(total.dtype)

    def _batch_hard(self, d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        valid = pos.any(dim=1) & neg.any(dim=1)
        d, pos, neg = d[valid], pos[valid], neg[valid]
        with torch.no_grad():
            hardest_pos = d.masked_fill(~pos, float("-inf")).argmax(dim=1, keepdim=True)
            hardest_neg = d.masked_fill(~neg, float("inf")).argmin(dim=1, keepdim=True)
        d_ap, d_an = d.gather(1, hardest_pos).squeeze(1), d.gather(1, hardest_neg).squeeze(1)
        return torch.relu(d_ap - d_an + self.margin)

    def _semi_hard(self, d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        pairs = torch.nonzero(pos & neg.any(dim=1, keepdim=True))  # (anchor row, positive column)
        a, p = pairs[:, 0], pairs[:, 1]
        d_ap = d[a, p]
        with torch.no_grad():
            d_rows, neg_rows = d[a], neg[a]  # [pairs, B]
            farther = neg_rows & (d_rows > d_ap.unsqueeze(1))
            semi = d_rows.masked_fill(~farther, float("inf")).argmin(dim=1)
            hardest_easy = d_rows.masked_fill(~neg_rows, float("-inf")).argmax(dim=1)
            chosen = torch.where(farther.any(dim=1), semi, hardest_easy)
        return torch.relu(d_ap - d[a, chosen] + self.margin)
