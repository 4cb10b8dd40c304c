"""UniTSFace: margin softmax (CosFace) + the USS loss (seed 003, 3rd abstract; REFERENCES.md).

USS is a sample-to-sample BCE with ONE learned unified threshold b: the features a sample is
compared with are the latest features of every class (a memory ``M_c``, sharded with the
prototypes, detached), so positives and negatives are real samples. Per sample i:
``u_i = log(1 + e^{−(s(cos(x_i, M_{y_i}) − m) − b)}) + Σ_{c≠y_i} log(1 + e^{s·cos(x_i, M_c) − b})``,
m = 0.1, s = 64 (the official defaults). The loss is ``CE + weight·mean_i u_i``; the USS term is
switched on after ``start_iter`` steps (the official code: after the first epoch).

Sharding and sampling follow the head: the sum over c runs over this step's sampled classes on all
ranks whose memory has been written (a class never seen yet has no feature and is skipped), the
positive term only where ``M_{y_i}`` exists. The memory is written after the logits, with the
normalised features of the owned samples of the global batch (the last sample of a class wins), so
step t compares with features of steps < t. b is replicated (replicated.py); it is initialised on
the first step the term is active and any memory row exists, to the global batch mean of
``logsumexp_{c≠y}(s·cos(x_i, M_c))`` (the official lazy initialisation), and its gradient is
all-reduced in the forward like BCEHead's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fr_train.heads.cross_entropy import logits_matmul, margin_softmax_ce
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.optim import RowSparseAdamW, RowSparseSGD
from fr_train.heads.partial_fc import PartialFC
from fr_train.heads.replicated import REPLICATED_KEY, move_in, move_out, rebuild_with
from fr_train.heads.sampled_step import check_seed_head, load_with_memory_rows, sampled_step
from fr_train.heads.vpl import NEVER_WRITTEN, write_latest
from fr_train.parallel.collectives import all_reduce_

_MEMORY_ROWS = ("uss_memory", "uss_memory_iter")


class USSHead(PartialFC):
    """PartialFC (margin CE, sharding, sampling, optimizer) plus the USS term on a class memory.

    Same constructor as :class:`PartialFC` (``vpl`` must be None) plus ``uss_margin`` (m),
    ``uss_weight`` and ``start_iter`` (the term is on when ``iteration > start_iter``)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        vpl: None = None,
        *,
        uss_margin: float = 0.1,
        uss_weight: float = 1.0,
        start_iter: int = 0,
        **kwargs: Any,
    ) -> None:
        check_seed_head("USSHead", margin, vpl, "UniTSFace uses CombinedMargin.cosface(0.4)")
        if not uss_weight > 0 or start_iter < 0:
            raise ValueError(f"USSHead uss_weight must be > 0 and start_iter >= 0, got {uss_weight}, {start_iter}")
        super().__init__(num_classes, embedding_size, margin, sample_rate, group, None, **kwargs)
        self.uss_margin, self.uss_weight, self.start_iter = float(uss_margin), float(uss_weight), int(start_iter)
        dev, dtype = self.weight.device, self.weight.dtype
        self.register_buffer("uss_memory", torch.zeros(self.num_local, embedding_size, dtype=dtype, device=dev))
        self.register_buffer("uss_memory_iter", torch.full((self.num_local,), NEVER_WRITTEN, dtype=torch.int64,
                                                           device=dev))
        bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.unified_bias = nn.Parameter(torch.zeros(1, dtype=bias_dtype, device=dev))
        self.register_buffer("unified_bias_ready", torch.zeros((), dtype=torch.bool, device=dev))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        st = sampled_step(self, embeddings, labels)
        loss = margin_softmax_ce(st.x, st.w, None, st.target_col, self.margin, self.comm, self.matmul_dtype)
        idx = self.last_sampled_classes - self.class_start
        if self.iteration > self.start_iter:
            loss = loss + self.uss_weight * self._uss(st.x, st.target_col, idx)
        if self.training:
            owned = torch.nonzero(st.target_col >= 0).squeeze(1)
            write_latest(self.uss_memory, self.uss_memory_iter, st.labels[owned] - self.class_start,
                         st.x[owned].detach(), self.iteration)
        return loss

    def _uss(self, x: torch.Tensor, target_col: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        s, batch = self.margin.s, x.shape[0]
        written = self.uss_memory_iter.index_select(0, idx) != NEVER_WRITTEN
        memory = self.uss_memory.index_select(0, idx).detach().to(x.dtype)
        cos = logits_matmul(x, memory.t(), self.matmul_dtype, x.dtype)  # [B, S] against real features
        rows = torch.nonzero(target_col >= 0).squeeze(1)
        cols = target_col[rows]
        positive = torch.zeros_like(cos, dtype=torch.bool)
        positive[rows, cols] = True
        positive &= written.unsqueeze(0)
        negative = written.unsqueeze(0) & ~positive
        negative[rows, cols] = False
        z = s * cos
        z_pos = s * (cos - self.uss_margin)
        if not bool(self.unified_bias_ready) and not (self.training and self._lazy_init(z.detach(), negative)):
            return 0.0 * x.sum()  # b not set (nothing in memory on any rank yet): no term, on every rank
        b_param = self.unified_bias.to(x.dtype).sum()
        b = b_param.detach()
        # USS: log(1 + e^{−(s(cos_p − m) − b)}) on positives + log(1 + e^{s·cos_n − b}) on negatives
        local = (F.softplus(b - z_pos) * positive).sum() + (F.softplus(z - b) * negative).sum() + 0.0 * x.sum()
        with torch.no_grad():
            grad_b = (torch.sigmoid(b - z_pos) * positive).sum() - (torch.sigmoid(z - b) * negative).sum()
            totals = torch.stack([local.detach(), grad_b])
            all_reduce_(self.comm, totals, dist.ReduceOp.SUM)
        return (totals[0] + (local - local.detach()) + (b_param - b) * totals[1]) / batch

    @torch.no_grad()
    def _lazy_init(self, z: torch.Tensor, negative: torch.Tensor) -> bool:
        """b ← global batch mean of ``logsumexp_{c≠y}(s·cos)`` over rows with any negative (distributed
        logsumexp: all-reduce max, then the exp-sums). False when no rank has a memory row yet."""
        masked = z.masked_fill(~negative, float("-inf"))
        row_max = masked.max(dim=1).values if z.shape[1] else z.new_full((z.shape[0],), float("-inf"))
        all_reduce_(self.comm, row_max, dist.ReduceOp.MAX)
        has = torch.isfinite(row_max)
        shift = torch.where(has, row_max, torch.zeros_like(row_max))
        sums = torch.exp(masked - shift.unsqueeze(1)).sum(dim=1)
        all_reduce_(self.comm, sums, dist.ReduceOp.SUM)
        if not bool(has.any()):
            return False
        lse = sums[has].log() + shift[has]
        self.unified_bias.fill_(float(lse.mean()))
        self.unified_bias_ready.fill_(True)
        return True

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
        """PartialFC's state + the class memory in ``rows`` (per class: reshardable) + b under ``replicated``."""
        state = super().live_state()
        state["rows"].update(uss_memory=self.uss_memory.detach(), uss_memory_iter=self.uss_memory_iter.detach())
        move_out(state, {"unified_bias": self.unified_bias})
        state[REPLICATED_KEY]["unified_bias_ready"] = {"value": self.unified_bias_ready.detach(), "optimizer": None}
        state["uss"] = {"margin": self.uss_margin, "weight": self.uss_weight, "start_iter": self.start_iter}
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> None:  # type: ignore[override]
        state, values = move_in(state, ["unified_bias"])
        ready = state[REPLICATED_KEY].get("unified_bias_ready", {}).get("value")
        if ready is None:
            raise ValueError("head state: field 'replicated.unified_bias_ready' is missing (not a USSHead state)")
        load_with_memory_rows(self, state, _MEMORY_ROWS, "the USS class memory", strict, assign)
        with torch.no_grad():
            self.unified_bias.copy_(values["unified_bias"])
            self.unified_bias_ready.copy_(ready)

