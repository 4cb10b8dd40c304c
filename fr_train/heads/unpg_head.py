"""UNPG (Jung et al., "Unified Negative Pair Generation", seed 001; REFERENCES.md) on the sharded head.

The classifier's negatives (CLPG: sample vs. other prototypes) are joined by negative pairs of
real features (MLPG): the cosines ``n_k = cos(x_i, x_j)``, ``i < j``, ``y_i ≠ y_j``, of the GLOBAL batch
(the official code uses one GPU's batch and reports a DDP accuracy drop; here every rank's samples
pair with every other's). Easy and outlying pairs are filtered by the box-and-whisker rule: keep
``n_k ∈ [Q1 − w·IQR, Q3 + w·IQR]`` (w = 1.5 as in their yaml; quartiles by linear interpolation;
the thresholds are not differentiated). Every row's softmax then runs over
``s·[g(cos θ_y), cos θ_j (j sampled, j ≠ y), n_k (k kept)]``: ``ℓ_i = −log softmax(...)_y``, mean over
the global batch.

The pair columns are identical for every row, so they enter each row's denominator as ONE column
with logit ``logsumexp_k(s·n_k)`` — exact for the value and the gradient, and O(pairs) instead of
O(B × pairs) memory. Rank 0 alone appends that column (it is added to the distributed sum once);
the other ranks never form the pair matrix.

The distributed softmax is cross_entropy.sharded_softmax_ce (value all-reduced, exact gradient by a surrogate).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fr_train.heads.cross_entropy import logits_matmul, sharded_softmax_ce
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.partial_fc import PartialFC
from fr_train.heads.sampled_step import check_seed_head, sampled_step


def linear_quantile(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile of an ascending 1-d tensor by linear interpolation at ``q·(n − 1)`` (numpy's default);
    unlike ``torch.quantile`` it has no input-size limit (B = 8192 gives 33M pairs)."""
    n = sorted_values.numel()
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def filtered_negative_pairs(x: torch.Tensor, labels: torch.Tensor, whisker: float) -> tuple[torch.Tensor, int]:
    """Cosines of the in-batch negative pairs (i < j, different labels) kept by the box-and-whisker
    rule, and the number of negative pairs before filtering."""
    sim = x @ x.t()
    upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
    values = sim[upper & (labels.unsqueeze(1) != labels.unsqueeze(0))]
    if values.numel() == 0:
        return values, 0
    with torch.no_grad():  # thresholds are statistics of the batch, not differentiated
        ordered = torch.sort(values.detach()).values
        q1, q3 = linear_quantile(ordered, 0.25), linear_quantile(ordered, 0.75)
        iqr = q3 - q1
        keep = (values >= q1 - whisker * iqr) & (values <= q3 + whisker * iqr)
    return values[keep], values.numel()


class UNPGHead(PartialFC):
    """PartialFC (sharding, sampling, optimizer, checkpoint) with UNPG's in-batch negative pairs.

    Same constructor as :class:`PartialFC` (``vpl`` must be None) plus ``whisker`` (w). After a
    forward, ``last_pairs`` holds ``(kept, total)`` negative pairs as 0-d tensors (rank 0; zeros elsewhere)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        vpl: None = None,
        *,
        whisker: float = 1.5,
        **kwargs: Any,
    ) -> None:
        check_seed_head("UNPGHead", margin, vpl, "ArcFace/CosFace...")
        if not whisker >= 0:
            raise ValueError(f"UNPGHead whisker w must be >= 0, got {whisker}")
        super().__init__(num_classes, embedding_size, margin, sample_rate, group, None, **kwargs)
        self.whisker = float(whisker)
        self.last_pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        st = sampled_step(self, embeddings, labels)
        s, batch = self.margin.s, st.x.shape[0]
        cos = logits_matmul(st.x, st.w.t(), self.matmul_dtype, st.x.dtype)  # [B, S]
        rows = torch.nonzero(st.target_col >= 0).squeeze(1)
        cols = st.target_col[rows]
        target_local = s * self.margin.target_cos(cos[rows, cols])
        logits = (s * cos).index_put((rows, cols), target_local)  # out of place: autograd keeps s·cos
        kept = total = torch.zeros((), dtype=torch.int64, device=cos.device)
        if self.comm.rank == 0:
            pairs, n_total = filtered_negative_pairs(st.x, st.labels, self.whisker)
            kept, total = torch.tensor(pairs.numel()), torch.tensor(n_total)
            if pairs.numel():
                pair_column = torch.logsumexp(s * pairs, dim=0)  # all pair columns merged into one
                logits = torch.cat([logits, pair_column.expand(batch, 1)], dim=1)
        self.last_pairs = (kept, total)

        return sharded_softmax_ce(logits, rows, cols, self.comm, st.x)
