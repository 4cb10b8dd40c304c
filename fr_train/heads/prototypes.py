"""One step's prototype columns, built chunk by chunk from the stored rows, and the margin-softmax
cross-entropy over them that keeps no ``[S, D]`` copy of the sampled rows between forward and backward.

The prototype of sampled class j (DESIGN.md "The sharded head"; VPL paper eq. 4–5):
``w̃_j = normalize(W_j)`` for a normalised margin (``W_j`` cast from the storage dtype to the compute
dtype), then, with VPL, ``normalize((1−λ_j)·w̃_j + λ_j·M_j)`` where ``λ_j = λ`` for the classes whose
memory is fresh (vpl.py) and 0 otherwise; a linear margin (softmax preset) uses ``W_j`` and a bias.
:meth:`SampledPrototypes.build` is the one place this is written; every head uses it.

Why chunks and recomputation: with S sampled columns, autograd through gather → cast → normalize →
VPL mix → normalize → ``x·w̃ᵀ`` keeps about five ``[S, D]`` float32 tensors from forward to backward
and the VPL bank's rows for every column: 13.3 KB per sampled class at D = 512 (CPU RSS, RESULTS.md),
20 GB at 30M classes and rate 0.05 (1.5M columns), which is what kept 30M classes from one 80 GB GPU
(issue 13). :class:`PrototypeMarginCE` instead builds the prototypes of ``chunk_rows`` columns at a
time, writes their logits into the one ``B × S`` buffer (which becomes the softmax, as in
cross_entropy.py) and drops them; backward rebuilds each chunk with autograd on, forms its share of
``dL/dx`` and ``dL/dw̃``, back-propagates through ``build`` to the stored rows, and writes that
gradient into one ``[S, D]`` tensor in the STORAGE dtype — the bytes autograd's cast hands back
anyway. What a step keeps per sampled column is then ``4·B`` bytes of softmax, the row gradient
(``D`` values of the storage dtype) and a few bytes of indices; the chunk's temporaries are bounded
by ``chunk_rows`` whatever S is. The price is building the prototypes twice (elementwise work on
S×D, small next to the two ``B × S × D`` matmuls).

The VPL bank is written in forward (step t's logits read the memory of steps < t), before backward
rebuilds the prototypes: :meth:`PartialFC._prototypes` therefore keeps, from before the write, the
timestamps of the sampled rows and the memory rows of the columns that inject it (few: at most the
classes seen in the last Δt steps); the other columns' memory is multiplied by λ = 0, so zeros
stand in for it exactly.

Same computation as before: within a chunk the operations are the ones autograd ran on all columns
at once; across chunks only the summation order of ``dL/dx`` changes (a sum over chunks of
``g_chunk·w̃_chunk``), float rounding. With S ≤ ``chunk_rows`` it is one chunk, bitwise as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fr_train.heads.cross_entropy import logit_grad_in_place, logits_matmul, softmax_ce_in_place
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.vpl import VPLConfig, fresh_rows, inject
from fr_train.parallel.sharding import Comm

CHUNK_ROWS = 1 << 16
"""Columns built at a time: 65,536 × 512 float32 = 128 MiB per ``[rows, D]`` temporary. At 93k
classes and rate 1 that is two chunks; at 1.5M sampled columns, 23."""


class IndexRows(torch.autograd.Function):
    """``param[idx]`` whose gradient is a sparse COO tensor with rows ``idx`` (sorted, unique), so a
    large shard never gets a dense gradient."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.shape = param.shape
        return param.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        return row_gradient(grad, idx, ctx.shape), None


def row_gradient(values: torch.Tensor, idx: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """The gradient of a parameter of ``shape`` whose rows ``idx`` (sorted, unique; None = all rows)
    received ``values``: sparse COO over those rows, dense when every row was used."""
    if idx is None:
        return values
    return torch.sparse_coo_tensor(idx.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False)


@dataclass
class SampledPrototypes:
    """The columns of one step: rows ``idx`` (sorted local rows; None = every row) of ``weight``
    (and ``bias``), turned into prototypes by :meth:`build`. VPL fields (module docstring), read
    before this step's write to the bank: the sampled rows' timestamps ``memory_iter``; when VPL
    injects this step, ``fresh_memory`` [1 + F, D] (``compute_dtype``): a zero row, then the memory
    rows of the F columns that inject it, and ``memory_slot`` [S]: each column's row in it (0 for
    the others), so a chunk's memory is one ``index_select`` with no host synchronisation."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    idx: torch.Tensor | None
    normalize: bool
    compute_dtype: torch.dtype
    step: int
    vpl: VPLConfig | None = None
    memory_iter: torch.Tensor | None = None
    memory_slot: torch.Tensor | None = None  # None (with fresh_memory None): VPL does not inject this step
    fresh_memory: torch.Tensor | None = None
    chunk_rows: int = CHUNK_ROWS

    @property
    def num_cols(self) -> int:
        return self.weight.shape[0] if self.idx is None else int(self.idx.numel())

    def chunks(self) -> list[tuple[int, int]]:
        n = self.num_cols
        return [(lo, min(lo + self.chunk_rows, n)) for lo in range(0, n, self.chunk_rows)]

    def injected_fraction(self) -> torch.Tensor:
        """Fraction of the columns whose prototype is variational (0-d; reading it is the caller's sync)."""
        assert self.vpl is not None and self.memory_iter is not None
        return fresh_rows(self.vpl, self.memory_iter, self.step).float().mean()

    def gather(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored rows of columns ``lo:hi`` (storage dtype; views when ``idx`` is None)."""
        if self.idx is None:
            return self.weight[lo:hi], None if self.bias is None else self.bias[lo:hi]
        rows = self.idx[lo:hi]
        return self.weight.index_select(0, rows), None if self.bias is None else self.bias.index_select(0, rows)

    def build(self, lo: int, hi: int, raw_w: torch.Tensor,
              raw_b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prototypes (and bias) of columns ``lo:hi`` from their stored rows; differentiable in both."""
        w = raw_w.to(self.compute_dtype)
        b = None if raw_b is None else raw_b.to(self.compute_dtype)
        if self.normalize:
            w = F.normalize(w, dim=1)
        if self.vpl is not None and self.memory_slot is not None:
            assert self.memory_iter is not None and self.fresh_memory is not None
            # λ = 0 on the columns that do not inject: the zero row stands in for their memory exactly.
            memory = self.fresh_memory.index_select(0, self.memory_slot[lo:hi])
            w = inject(self.vpl, w, memory, self.memory_iter[lo:hi], self.step)
        return w, b

    def full(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every column at once through autograd (sparse row gradients): for the heads whose loss
        needs the prototypes themselves (BCE, UNPG, USS, EPL), not only the margin softmax."""
        if self.idx is None:
            raw_w, raw_b = self.weight, self.bias
        else:
            raw_w = IndexRows.apply(self.weight, self.idx)
            raw_b = None if self.bias is None else IndexRows.apply(self.bias, self.idx)
        return self.build(0, self.num_cols, raw_w, raw_b)


class PrototypeMarginCE(torch.autograd.Function):
    """``MarginSoftmaxCE`` (cross_entropy.py) over prototypes built chunk by chunk (module docstring).
    Inputs that get gradients: ``x`` [B, D], ``weight`` and ``bias`` (the stored parameters, through
    ``protos``); the row gradients come back sparse over ``protos.idx`` (dense when it is None)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        protos: SampledPrototypes,
        target_col: torch.Tensor,
        margin: CombinedMargin,
        comm: Comm,
        matmul_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        dtype = protos.compute_dtype
        chunks = protos.chunks()
        if len(chunks) == 1:
            w, b = protos.build(0, protos.num_cols, *protos.gather(0, protos.num_cols))
            logits = logits_matmul(x, w.t(), matmul_dtype, dtype)
            if b is not None:
                logits += b
            del w, b
        else:
            logits = torch.empty((x.shape[0], protos.num_cols), dtype=dtype, device=x.device)
            for lo, hi in chunks:
                w, b = protos.build(lo, hi, *protos.gather(lo, hi))
                logits[:, lo:hi] = logits_matmul(x, w.t(), matmul_dtype, dtype)
                if b is not None:
                    logits[:, lo:hi] += b
                del w, b
        loss, (rows, cols, slope) = softmax_ce_in_place(logits, target_col, margin, comm)
        # weight and bias are saved (no copy) for autograd's version check: backward rebuilds the
        # prototypes from them, so an in-place change between forward and backward must raise.
        ctx.save_for_backward(x, weight, *(() if bias is None else (bias,)), rows, cols,
                              *(() if slope is None else (slope,)))
        ctx.has_bias = bias is not None
        ctx.probs, ctx.protos = logits, protos
        ctx.margin, ctx.matmul_dtype = margin, matmul_dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        x, _weight, *rest = ctx.saved_tensors  # unpacking runs the version check of weight (and bias)
        rows, cols, *maybe_slope = rest[1:] if ctx.has_bias else rest
        protos: SampledPrototypes = ctx.protos
        grad = ctx.probs  # consumed in place: the graph cannot be back-propagated twice
        ctx.probs = ctx.protos = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and protos.bias is not None
        grad_bias_cols = logit_grad_in_place(grad, (rows, cols, maybe_slope[0] if maybe_slope else None),
                                             ctx.margin, grad_loss, protos.bias is not None)
        grad_x = torch.zeros_like(x, dtype=grad.dtype) if need_x else None
        num, dim = protos.num_cols, protos.weight.shape[1]
        gw = protos.weight.new_empty((num, dim)) if need_w else None
        gb = protos.bias.new_empty((num,)) if need_b and protos.bias is not None else None
        for lo, hi in protos.chunks():
            raw_w, raw_b = protos.gather(lo, hi)
            raw_w = raw_w.detach().requires_grad_(need_w)
            raw_b = None if raw_b is None else raw_b.detach().requires_grad_(need_b)
            with torch.enable_grad():
                w, b = protos.build(lo, hi, raw_w, raw_b)
            g = grad[:, lo:hi]
            if grad_x is not None:
                grad_x += logits_matmul(g, w.detach(), ctx.matmul_dtype, grad.dtype)
            outputs, grads = [], []
            if need_w:
                outputs.append(w)
                grads.append(logits_matmul(g.t(), x, ctx.matmul_dtype, grad.dtype).to(w.dtype))
            if need_b and b is not None:
                assert grad_bias_cols is not None
                outputs.append(b)
                grads.append(grad_bias_cols[lo:hi].to(b.dtype))
            if outputs:
                torch.autograd.backward(outputs, grads)
            if gw is not None:
                assert raw_w.grad is not None
                gw[lo:hi] = raw_w.grad
            if gb is not None and raw_b is not None:
                assert raw_b.grad is not None
                gb[lo:hi] = raw_b.grad
            del w, b, raw_w, raw_b
        grad_w = None if gw is None else row_gradient(gw, protos.idx, protos.weight.shape)
        grad_b = None
        if gb is not None and protos.bias is not None:
            grad_b = row_gradient(gb, protos.idx, protos.bias.shape)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def prototype_margin_ce(
    x: torch.Tensor,
    protos: SampledPrototypes,
    target_col: torch.Tensor,
    margin: CombinedMargin,
    comm: Comm,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Global-batch mean margin-softmax loss of ``x`` [B, D] (gathered features) against this rank's
    columns ``protos``; ``target_col`` [B]: each row's column, −1 where another rank owns its class."""
    return PrototypeMarginCE.apply(x, protos.weight, protos.bias, protos, target_col, margin, comm, matmul_dtype)
