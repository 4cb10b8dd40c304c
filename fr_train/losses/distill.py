"""Knowledge distillation from a frozen teacher over the GLOBAL batch (seed 002; EKD, Huang et al.,
"Evaluation-oriented Knowledge Distillation for Deep Face Recognition", CVPR 2022).

Two terms on L2-normalised student features ``x_i`` and teacher features ``t_i`` of the same images:

* feature distillation: ``F = mean_i ‖x_i − t_i‖²`` (needs equal embedding sizes);
* EKD, a similarity-matrix term that only cares about what verification measures. Face verification
  thresholds similarities at a false-positive rate, so EKD keeps, per model, the thresholds ``τ_a``
  at FPR ``1/a`` (``a`` ∈ anchors) estimated from the batch's negative pairs (sorted descending,
  ``τ_a`` = the value at index ``⌊n_neg/a⌋``; an exponential moving average over steps, momentum μ).
  A pair's soft *rank* counts the thresholds its similarity passes,
  ``r(c; τ) = Σ_a σ((c − τ_a)/T)`` (temperature T), and the student is asked to place the critical
  pairs on the same side of its thresholds as the teacher does of its own:
  ``E = w_pos·mean_{pos (i<j)} (r(S_ij; τ^S) − r(T_ij; τ^T))² + w_neg·mean_{top-k neg} (…)²``,
  where the negatives are the k with the highest student similarity (the false accepts in the
  making), and the thresholds are not differentiated. Unlike feature matching this leaves a small
  student free to arrange its space as long as its verification decisions match the teacher's.

Distribution follows fr_train/parallel/global_batch.py: features are all-gathered (autograd-aware),
the thresholds and the hard-negative selection are computed from the detached global similarity
matrix (identical on every rank), each rank computes the terms of the pairs whose first index it
owns, and ``sum_over_ranks`` adds them: the value is the same everywhere and rank r's gradient is
exactly ``dL/d(its features)``, the sharded head's gradient contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fr_train.parallel.collectives import gather_rows_nograd
from fr_train.parallel.global_batch import gather_global_batch, sum_over_ranks
from fr_train.parallel.sharding import resolve_group

EKD_ANCHORS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
"""FPR levels 1/a at which EKD places its thresholds (the verification operating points)."""


@dataclass(frozen=True)
class DistillWeights:
    feature: float = 0.0
    ekd_pos: float = 0.0
    ekd_neg: float = 0.0
    ekd_topk: int = 2000
    """Hardest negatives (by student similarity) of the global batch that EKD constrains."""
    ekd_temperature: float = 0.01
    ekd_momentum: float = 0.01


def soft_rank(c: torch.Tensor, thresholds: torch.Tensor, temperature: float) -> torch.Tensor:
    """``r(c; τ) = Σ_a σ((c − τ_a)/T)``: how many verification thresholds ``c`` passes, smoothly."""
    return torch.sigmoid((c.unsqueeze(-1) - thresholds) / temperature).sum(-1)


def fpr_thresholds(neg: torch.Tensor, anchors: tuple[int, ...]) -> torch.Tensor:
    """Similarity at FPR 1/a for each anchor: the ``⌊n/a⌋``-th largest negative similarity."""
    ordered = torch.sort(neg, descending=True).values
    idx = torch.tensor([min(neg.numel() // a, neg.numel() - 1) for a in anchors], device=neg.device)
    return ordered[idx]


class DistillLoss(nn.Module):
    """``forward(student [b, D], teacher [b, Dt], labels [b])`` → global-batch distillation loss,
    identical on every rank. Buffers: the EMA thresholds of student and teacher (checkpointed)."""

    def __init__(self, weights: DistillWeights, anchors: tuple[int, ...] = EKD_ANCHORS,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if min(weights.feature, weights.ekd_pos, weights.ekd_neg) < 0:
            raise ValueError(f"distillation weights must be >= 0, got {weights}")
        if weights.ekd_topk < 1 or not weights.ekd_temperature > 0 or not 0 < weights.ekd_momentum <= 1:
            raise ValueError(f"EKD needs topk >= 1, temperature > 0 and momentum in (0, 1], got {weights}")
        self.weights, self.anchors = weights, tuple(anchors)
        self.comm = resolve_group(group)
        self.register_buffer("student_thresholds", torch.zeros(len(anchors), dtype=torch.float64))
        self.register_buffer("teacher_thresholds", torch.zeros(len(anchors), dtype=torch.float64))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.last_terms: dict[str, float] = {}

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.weights
        gb = gather_global_batch(self.comm, student, labels, "DistillLoss.forward")
        t = gather_rows_nograd(self.comm, F.normalize(teacher.detach().to(gb.x.dtype), dim=1), gb.sizes)
        if t.shape[0] != gb.x.shape[0]:
            raise ValueError(f"DistillLoss.forward: {t.shape[0]} teacher features for {gb.x.shape[0]} students")
        x_local = gb.x[gb.local]
        total = x_local.sum() * 0.0  # keeps the graph on a rank with no rows
        terms: dict[str, float] = {}
        if w.feature:
            if t.shape[1] != gb.x.shape[1]:
                raise ValueError(f"distill.feature_weight needs equal embedding sizes: student {gb.x.shape[1]}, "
                                 f"teacher {t.shape[1]}; use EKD only (distill.feature_weight=0)")
            local = (x_local - t[gb.local]).square().sum()
            feature = sum_over_ranks(self.comm, local) / gb.x.shape[0]
            terms["feature"] = float(feature.detach())
            total = total + w.feature * feature
        if w.ekd_pos or w.ekd_neg:
            ekd_pos, ekd_neg = self._ekd(gb.x, x_local, t, gb.labels, gb.start)
            terms.update(ekd_pos=float(ekd_pos.detach()), ekd_neg=float(ekd_neg.detach()))
            total = total + w.ekd_pos * ekd_pos + w.ekd_neg * ekd_neg
        self.last_terms = terms
        return total

    def _ekd(self, x: torch.Tensor, x_local: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
             start: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self.weights, x.shape[0]
        upper = torch.ones(b, b, dtype=torch.bool, device=x.device).triu(1)  # each unordered pair once
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        pos, neg = upper & same, upper & ~same
        with torch.no_grad():  # thresholds and the hard-negative choice: same on every rank, no gradient
            s_full, t_full = x.detach() @ x.detach().t(), t @ t.t()
            if int(neg.sum()) > 0:
                cur_s, cur_t = fpr_thresholds(s_full[neg], self.anchors), fpr_thresholds(t_full[neg], self.anchors)
                if self.training:
                    m = w.ekd_momentum if bool(self.initialised) else 1.0  # the first batch sets them
                    self.student_thresholds.mul_(1 - m).add_(m * cur_s.double())
                    self.teacher_thresholds.mul_(1 - m).add_(m * cur_t.double())
                    self.initialised.fill_(True)
            hard = torch.zeros_like(neg)
            k = min(w.ekd_topk, int(neg.sum()))
            if k:
                flat = torch.where(neg, s_full, torch.full_like(s_full, -torch.inf)).flatten()
                hard.view(-1)[torch.topk(flat, k).indices] = True
        rows = slice(start, start + x_local.shape[0])
        s_rows = x_local @ x.t()  # this rank's pairs (i owned), with gradient
        tau_s = self.student_thresholds.to(s_rows.dtype)
        tau_t = self.teacher_thresholds.to(s_rows.dtype)
        gap = (soft_rank(s_rows, tau_s, w.ekd_temperature)
               - soft_rank(t_full[rows].to(s_rows.dtype), tau_t, w.ekd_temperature)).square()
        out = []
        for mask in (pos, hard):  # global masks: their counts are the same on every rank
            local = (gap * mask[rows]).sum()
            out.append(sum_over_ranks(self.comm, local) / max(int(mask.sum()), 1))
        return out[0], out[1]
