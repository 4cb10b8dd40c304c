"""BCE with one unified bias (UniFace, seed 003 2nd abstract; REFERENCES.md) on the sharded head.

Every (sample, class) pair is a binary decision against ONE learned threshold b shared by all
classes, so the threshold that separates positives from negatives is the same for every sample
(the "uniform classification" of the paper). Per sample i with target class y:
``ℓ_i = log(1 + e^{−(s·g(cos θ_y) − b)}) + λ·Σ_{j≠y} log(1 + e^{s·cos θ_j − b})``,
``g(cos) = cos − m`` for the paper's CosFace margin (any CombinedMargin target works), s = 64,
m = 0.4, λ = 1, ``b`` initialised to ``log(C·r·10)`` (official code, r = 1). The loss is the mean
over the global batch; the sum over j runs over the classes sampled this step on all ranks
(every class at sample_rate 1).

Distribution: rank r sums the terms of its sampled columns (the positive term only where it owns
y) and the partial sums are all-reduced (``sum_over_ranks``: value = global loss on every rank,
gradient = the local part, so the gather's reduce-scatter counts each term once). b is replicated:
its gradient ``∂L/∂b = (1/B)·Σ[σ(b − z_y) − λ·Σ_{j≠y} σ(z_j − b)]`` is computed in the forward and
all-reduced together with the loss, so every rank's ``unified_bias.grad`` is the full gradient and
every rank applies the same update (no collective in backward).
Memory: autograd keeps a few ``B × S`` buffers (the margin-softmax head keeps one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fr_train.heads.cross_entropy import logits_matmul
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.optim import RowSparseAdamW, RowSparseSGD
from fr_train.heads.partial_fc import PartialFC
from fr_train.heads.replicated import move_in, move_out, rebuild_with
from fr_train.heads.sampled_step import check_seed_head, sampled_step
from fr_train.parallel.collectives import all_reduce_


class BCEHead(PartialFC):
    """PartialFC's sharding, sampling, optimizer and checkpoint, with UniFace's BCE loss.

    Same constructor as :class:`PartialFC` (``vpl`` must be None) plus ``neg_weight`` (λ) and
    ``bias_ratio`` (r in ``b₀ = log(C·r·10)``). The unified bias is the parameter ``unified_bias``
    (shape [1], fp32, or fp64 with fp64 storage); :meth:`make_optimizer` includes it (with the same
    lr, momentum and weight decay as the prototypes)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        vpl: None = None,
        *,
        neg_weight: float = 1.0,
        bias_ratio: float = 1.0,
        **kwargs: Any,
    ) -> None:
        check_seed_head("BCEHead", margin, vpl, "UniFace uses CombinedMargin.cosface(0.4)")
        if not neg_weight > 0 or not bias_ratio > 0:
            raise ValueError(f"BCEHead neg_weight and bias_ratio must be > 0, got {neg_weight}, {bias_ratio}")
        super().__init__(num_classes, embedding_size, margin, sample_rate, group, None, **kwargs)
        self.neg_weight, self.bias_ratio = float(neg_weight), float(bias_ratio)
        bias_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.unified_bias = nn.Parameter(torch.full((1,), math.log(num_classes * bias_ratio * 10.0),
                                                    dtype=bias_dtype, device=self.weight.device))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        st = sampled_step(self, embeddings, labels)
        s, lam, batch = self.margin.s, self.neg_weight, st.x.shape[0]
        cos = logits_matmul(st.x, st.w.t(), self.matmul_dtype, st.x.dtype)  # [B, S]
        b_param = self.unified_bias.to(cos.dtype).sum()
        b = b_param.detach()
        rows = torch.nonzero(st.target_col >= 0).squeeze(1)
        cols = st.target_col[rows]
        negative = torch.ones_like(cos, dtype=torch.bool)
        negative[rows, cols] = False
        z_neg = s * cos
        z_pos = s * self.margin.target_cos(cos[rows, cols])
        # UniFace: log(1 + e^{−(z_y − b)}) + λ·Σ_{j≠y} log(1 + e^{z_j − b})
        local = F.softplus(b - z_pos).sum() + lam * (F.softplus(z_neg - b) * negative).sum() + 0.0 * st.x.sum()
        with torch.no_grad():  # ∂/∂b of the same terms: softplus' = σ
            grad_b = torch.sigmoid(b - z_pos).sum() - lam * (torch.sigmoid(z_neg - b) * negative).sum()
            totals = torch.stack([local.detach(), grad_b])
            all_reduce_(self.comm, totals, dist.ReduceOp.SUM)
        # Value: the global sum; gradient: the local terms (reduce-scattered by the gather) and, for the
        # replicated b, the all-reduced ∂/∂b (b − b.detach() is 0 in value).
        total = totals[0] + (local - local.detach()) + (b_param - b) * totals[1]
        return total / batch

    def step_stats(self) -> dict[str, float]:
        """PartialFC's, plus the learned unified threshold on the cosine scale (b / s)."""
        return {**super().step_stats(), "unified_threshold": float(self.unified_bias.detach().sum()) / self.margin.s}

    def make_optimizer(self, lr: float, *args: Any, **kwargs: Any) -> RowSparseSGD | RowSparseAdamW:
        """PartialFC's row-sparse optimizer over the prototypes and the unified bias (one row)."""
        opt = super().make_optimizer(lr, *args, **kwargs)
        self.optimizer = rebuild_with(opt, [("weight", self.weight), ("unified_bias", self.unified_bias)],
                                      kwargs.get("state_dtype"))
        return self.optimizer

    def live_state(self) -> dict[str, Any]:
        """PartialFC's state with b (and its optimizer rows) under ``replicated`` (replicated.py)."""
        state = super().live_state()
        move_out(state, {"unified_bias": self.unified_bias})
        state["neg_weight"], state["bias_ratio"] = self.neg_weight, self.bias_ratio
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> None:  # type: ignore[override]
        state, values = move_in(state, ["unified_bias"])
        super().load_state_dict(state, strict, assign)
        with torch.no_grad():
            self.unified_bias.copy_(values["unified_bias"])
