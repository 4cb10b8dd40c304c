"""EPL: empirical prototype learning (seed 003, 1st abstract; REFERENCES.md; official code
WakingHours-GitHub/EPL, class ``CosFace_EPL``) on the sharded head.

Each class keeps an empirical prototype ``P_c`` (an estimate of the class feature expectation,
sharded with the prototypes, never trained by gradient). Every training step, BEFORE the loss, each
sample of the global batch updates the prototype of its class by its similarity:
``f = softsign(⟨P_y, x⟩)``, ``P_y ← normalize(f·P_y + (1 − f)·x)``: the weight kept on the old
prototype grows with the sample's similarity to it (the paper's adaptive update). For a class present several times in the batch each
candidate is computed from the pre-step prototype and the LAST sample in batch order wins (the
official vectorised write leaves this to the device).

Loss: CosFace/ArcFace margin softmax of the B samples against the trained prototypes W and, once
``iteration > start_iter`` (official: from epoch 4), B more rows against the empirical prototypes:
``s·cos(x_i, P_j)`` with the target reduced by the adaptive margin ``k·cos(x_i, P_y)`` taken as a
constant (``cos − k·sg(cos)``, k = 0.7): normal samples (high similarity) get a larger margin, hard
samples a smaller one. The official loss ``log(1 + Σ_neg e^{z}·Σ_pos e^{−z})`` with one positive
is exactly softmax cross-entropy; the mean runs over all 2B rows. Sampling: the empirical rows use
the sampled columns of the step (all classes at sample_rate 1; the official code uses all).
Initial prototypes are random unit rows (the official code uses unnormalised ``randn``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fr_train.heads.cross_entropy import logits_matmul, margin_softmax_ce, sharded_softmax_ce
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.partial_fc import PartialFC, _block_init
from fr_train.heads.sampled_step import check_seed_head, load_with_memory_rows, sampled_step
from fr_train.heads.vpl import NEVER_WRITTEN, write_latest

_MEMORY_ROWS = ("epl_memory", "epl_memory_iter")


class EPLHead(PartialFC):
    """PartialFC (margin CE, sharding, sampling, optimizer) plus EPL's empirical-prototype rows.

    Same constructor as :class:`PartialFC` (``vpl`` must be None) plus ``k`` (adaptive margin
    factor) and ``start_iter`` (empirical rows join the loss when ``iteration > start_iter``)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        vpl: None = None,
        *,
        k: float = 0.7,
        start_iter: int = 0,
        **kwargs: Any,
    ) -> None:
        check_seed_head("EPLHead", margin, vpl, "EPL uses CombinedMargin.cosface(0.4)")
        if not 0.0 <= k < 1.0 or start_iter < 0:
            raise ValueError(f"EPLHead k must be in [0, 1) and start_iter >= 0, got {k}, {start_iter}")
        super().__init__(num_classes, embedding_size, margin, sample_rate, group, None, **kwargs)
        self.k, self.start_iter = float(k), int(start_iter)
        dev, dtype = self.weight.device, self.weight.dtype
        memory = _block_init(self.class_start, self.num_local, embedding_size, self.seed, 3, None, dtype, dev)
        self.register_buffer("epl_memory", memory)
        self.register_buffer("epl_memory_iter", torch.full((self.num_local,), NEVER_WRITTEN, dtype=torch.int64,
                                                           device=dev))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        st = sampled_step(self, embeddings, labels)
        loss = margin_softmax_ce(st.x, st.w, None, st.target_col, self.margin, self.comm, self.matmul_dtype)
        rows = torch.nonzero(st.target_col >= 0).squeeze(1)
        cols = st.target_col[rows]
        if self.training:
            self._update(st.x.detach(), st.labels[rows] - self.class_start, rows)
        if self.iteration <= self.start_iter:
            return loss
        idx = self.last_sampled_classes - self.class_start
        protos = F.normalize(self.epl_memory.index_select(0, idx).to(st.x.dtype), dim=1).detach()
        cos = logits_matmul(st.x, protos.t(), self.matmul_dtype, st.x.dtype)  # [B, S] against P
        target = cos[rows, cols]
        # Adaptive margin k·cos(x, P_y), held constant (official: vp_sim[y] −= k·vp_sim[y].data).
        logits = (self.margin.s * cos).index_put((rows, cols), self.margin.s * (target - self.k * target.detach()))
        empirical = sharded_softmax_ce(logits, rows, cols, self.comm, st.x)
        return 0.5 * (loss + empirical)  # the mean over 2B rows

    @torch.no_grad()
    def _update(self, x: torch.Tensor, local_labels: torch.Tensor, rows: torch.Tensor) -> None:
        """``P_y ← normalize(f·P_y + (1 − f)·x)``, ``f = softsign(⟨P_y, x⟩)`` (official update)."""
        if rows.numel() == 0:
            return
        feats = x[rows].to(self.epl_memory.dtype)
        current = self.epl_memory.index_select(0, local_labels)
        f = F.softsign((current * feats).sum(dim=1, keepdim=True))
        candidates = F.normalize(f * current + (1.0 - f) * feats, dim=1)
        write_latest(self.epl_memory, self.epl_memory_iter, local_labels, candidates, self.iteration)

    def live_state(self) -> dict[str, Any]:
        """PartialFC's state + the empirical prototypes in ``rows`` (per class: reshardable)."""
        state = super().live_state()
        state["rows"].update(epl_memory=self.epl_memory.detach(), epl_memory_iter=self.epl_memory_iter.detach())
        state["epl"] = {"k": self.k, "start_iter": self.start_iter}
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> None:  # type: ignore[override]
        load_with_memory_rows(self, state, _MEMORY_ROWS, "the EPL empirical prototypes", strict, assign)
