"""Softmax cross-entropy over column-sharded logits: the two distributed forms the heads use.

Rank r holds the logits of the global batch against its own prototype columns; both losses are the
softmax cross-entropy over the UNION of all ranks' columns,
``ℓ_i = max_i + log Σ_{r,j} exp(z_ij − max_i) − z_{i,y_i}``, with ``max_i`` all-reduced (MAX) and
the exp-sum and the target logit all-reduced (SUM; the target lives on exactly one rank), averaged
over the global batch — identical on every rank. They differ in who forms the logits and how the
gradient is obtained:

``margin_softmax_ce`` (the heads with a plain CombinedMargin over prototypes they hold: USS, EPL) forms ``x·Wᵀ`` and the
margin itself, with ONE logit buffer. The ``B × S`` buffer is turned into the softmax in place and
kept for backward, where ``dL/dz = (softmax − onehot)/B`` is formed in place again: there is never a
second ``B × S`` copy (autograd through ``exp``/``log_softmax`` would keep several). The margin only
touches the ``B`` target cosines; its slope is applied to those entries in backward. Backward
returns this shard's contribution to ``dL/dx`` for ALL gathered rows; the gather's backward sums
those contributions over ranks (each shard counted once).

The softmax and its gradient are written once (``softmax_ce_in_place`` / ``logit_grad_in_place``);
PartialFC's own loss (heads/prototypes.py ``PrototypeMarginCE``) uses them over a logit buffer it
fills chunk by chunk, building the prototypes in forward and again in backward instead of keeping
them (the memory of a 30M-class head).

``sharded_softmax_ce`` is for heads whose logits cannot go through ``MarginSoftmaxCE``: UNPG's
merged pair column, EPL's prototype-memory rows with a detached adaptive margin. It takes
``logits [B, S_r]`` with any autograd graph and goes through plain autograd. Its gradient comes from
the local surrogate ``Σ_i Σ_j e_ij / S_i − Σ_{i owned} z_{i,y_i}`` (S_i the all-reduced exp-sum,
held fixed), whose ``∂/∂z_ij = softmax_ij − onehot_ij`` is the exact gradient of the global loss
w.r.t. this rank's logits; the value returned is the exact all-reduced loss
(``value + (surrogate − surrogate.detach())``). Costs a few ``B × S`` buffers in autograd.

``logits_matmul`` is the shared ``x·Wᵀ`` of every head's logits, so that all of them honour
``matmul_dtype`` the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fr_train.heads.margin import CombinedMargin
from fr_train.parallel.collectives import all_reduce_
from fr_train.parallel.sharding import Comm


def logits_matmul(
    a: torch.Tensor, b: torch.Tensor, matmul_dtype: torch.dtype | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``a @ b`` in ``out_dtype``, the product behind every head's logits and their gradients.

    With ``matmul_dtype`` (bf16/fp16 on GPU) the product runs in that dtype with fp32 accumulation
    (cuBLAS default) and is returned in ``out_dtype``: the ``B × S`` matmul is the head's dominant
    cost, while the softmax and the margin need the precision of ``out_dtype``. Without it (or when
    it equals ``out_dtype``) both operands are cast to ``out_dtype``.
    """
    if matmul_dtype is not None and matmul_dtype != out_dtype:
        return torch.matmul(a.to(matmul_dtype), b.to(matmul_dtype)).to(out_dtype)
    return torch.matmul(a.to(out_dtype), b.to(out_dtype))


def softmax_ce_in_place(
    logits: torch.Tensor, target_col: torch.Tensor, margin: CombinedMargin, comm: Comm
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The loss of ``logits`` [B, S] (cosines, or raw logits when the margin is linear), which become
    the softmax IN PLACE (the buffer backward needs); returns ``(loss, saved)`` where ``saved`` =
    (target rows, their columns, the margin's slope on them or None) for :func:`logit_grad_in_place`."""
    batch, num_cols = logits.shape
    rows = torch.nonzero(target_col >= 0).squeeze(1)
    cols = target_col[rows]
    if margin.linear:
        slope = None
    else:
        # s·(g(cos θ_y) − m3) on the target, s·cos θ elsewhere (margin.py).
        target_cos, slope = margin.target_cos_and_slope(logits[rows, cols])
        logits.mul_(margin.s)
        logits[rows, cols] = margin.s * target_cos
    target = logits.new_zeros(batch)
    target[rows] = logits[rows, cols]

    row_max = logits.max(dim=1).values if num_cols > 0 else logits.new_full((batch,), float("-inf"))
    all_reduce_(comm, row_max, dist.ReduceOp.MAX)
    logits.sub_(row_max.unsqueeze(1)).exp_()
    sums = torch.stack([logits.sum(dim=1), target])
    all_reduce_(comm, sums, dist.ReduceOp.SUM)
    sum_exp, target = sums[0], sums[1]
    logits.div_(sum_exp.unsqueeze(1))  # the softmax, in the same buffer
    loss = (sum_exp.log() + row_max - target).mean()
    return loss, (rows, cols, slope)


def logit_grad_in_place(
    probs: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], margin: CombinedMargin,
    grad_loss: torch.Tensor, with_bias: bool,
) -> torch.Tensor | None:
    """Turn the softmax ``probs`` into ``dL/d(cosines)`` IN PLACE (``dL/d(logits)`` for a linear margin);
    return ``dL/d(bias)`` [S] when ``with_bias`` (the logits' gradient, before the margin's scale)."""
    rows, cols, slope = saved
    batch = probs.shape[0]
    probs[rows, cols] -= 1.0
    probs.mul_(grad_loss.to(probs.dtype) / batch)  # dL/dz = (softmax − onehot)·g/B
    grad_bias = probs.sum(dim=0) if with_bias else None
    if not margin.linear:
        assert slope is not None
        probs.mul_(margin.s)  # dz/dcos = s off-target
        probs[rows, cols] *= slope  # and s·g'(cos) on the target
    return grad_bias


class MarginSoftmaxCE(torch.autograd.Function):
    """Loss of the global batch against column shards, one logit buffer; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        target_col: torch.Tensor,
        margin: CombinedMargin,
        comm: Comm,
        matmul_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        dtype = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        logits = logits_matmul(x, w.t(), matmul_dtype, dtype)  # [B, S] cosines (or raw logits if linear)
        if bias is not None:
            logits += bias.to(dtype)
        loss, (rows, cols, slope) = softmax_ce_in_place(logits, target_col, margin, comm)
        ctx.save_for_backward(x, w, rows, cols, *(() if slope is None else (slope,)))
        ctx.probs = logits
        ctx.margin, ctx.has_bias, ctx.matmul_dtype = margin, bias is not None, matmul_dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        x, w, rows, cols, *maybe_slope = ctx.saved_tensors
        grad = ctx.probs  # consumed in place: the graph cannot be back-propagated twice
        ctx.probs = None
        grad_bias = logit_grad_in_place(grad, (rows, cols, maybe_slope[0] if maybe_slope else None), ctx.margin,
                                        grad_loss, ctx.has_bias)
        grad_x = logits_matmul(grad, w, ctx.matmul_dtype, grad.dtype).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = logits_matmul(grad.t(), x, ctx.matmul_dtype, grad.dtype).to(w.dtype) if ctx.needs_input_grad[1] else None
        if grad_bias is not None:
            grad_bias = grad_bias.to(w.dtype)
        return grad_x, grad_w, grad_bias, None, None, None, None


def margin_softmax_ce(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    target_col: torch.Tensor,
    margin: CombinedMargin,
    comm: Comm,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Global-batch mean loss. ``x``: [B, D] gathered features; ``w``: [S, D] this rank's columns;
    ``target_col``: [B] column of each row's class in ``w`` or −1 where another rank owns it."""
    return MarginSoftmaxCE.apply(x, w, bias, target_col, margin, comm, matmul_dtype)


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
