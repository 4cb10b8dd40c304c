"""Softmax cross-entropy over column-sharded logits, through plain autograd.

For heads whose logits cannot go through ``cross_entropy.MarginSoftmaxCE`` (which forms
``x·Wᵀ`` and a CombinedMargin itself): UNPG's merged pair column, EPL's prototype-memory rows
with a detached adaptive margin. Rank r holds ``logits [B, S_r]`` (any autograd graph) and the
target logit of the rows whose class it owns. The loss is
``ℓ_i = max_i + log Σ_{r,j} e^{z_ij − max_i} − z_{i,y_i}`` with the max all-reduced (MAX) and the
exp-sums and targets all-reduced (SUM), averaged over the B rows — identical on every rank.

Gradient: the local surrogate ``Σ_i Σ_j e_ij / S_i − Σ_{i owned} z_{i,y_i}`` (S_i the all-reduced
exp-sum, held fixed) has ``∂/∂z_ij = softmax_ij − onehot_ij``, the exact gradient of the global loss
w.r.t. this rank's logits; the value returned is the exact all-reduced loss
(``value + (surrogate − surrogate.detach())``). Costs a few ``B × S`` buffers in autograd.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fr_train.parallel.collectives import all_reduce_
from fr_train.parallel.sharding import Comm


def sharded_softmax_ce(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, comm: Comm,
                       anchor: torch.Tensor) -> torch.Tensor:
    """Global mean CE. ``logits``: [B, S] this rank's columns; ``(rows, cols)``: positions of the
    target logits this rank owns; ``anchor``: a tensor of the graph every rank must back-propagate
    through (the gathered features), so that a rank with no columns still joins the gather's backward."""
    batch = logits.shape[0]
    with torch.no_grad():
        row_max = logits.max(dim=1).values if logits.shape[1] else logits.new_full((batch,), float("-inf"))
        all_reduce_(comm, row_max, dist.ReduceOp.MAX)
    e = torch.exp(logits - row_max.unsqueeze(1))
    target = torch.zeros(batch, dtype=logits.dtype, device=logits.device).index_put((rows,), logits[rows, cols])
    with torch.no_grad():
        sums = torch.stack([e.sum(dim=1), target])
        all_reduce_(comm, sums, dist.ReduceOp.SUM)
        sum_e, target_all = sums[0], sums[1]
        value = (sum_e.log() + row_max - target_all).sum()
    surrogate = (e.sum(dim=1) / sum_e).sum() - target.sum() + 0.0 * anchor.sum()
    return (value + (surrogate - surrogate.detach())) / batch
