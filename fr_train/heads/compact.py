"""Compact per-class head state: fp8 (e4m3fn) rows with one float32 scale per row.

Why: at 30M classes the head's persistent state, not its compute, decides whether it fits one
80 GB GPU. With bf16 rows a VPL head keeps 3,080 B per class at 512-d (weight 1,024 + SGD momentum
1,024 + VPL bank 1,024 + int64 timestamp 8): 92 GB at 30M. Opt-in (``PartialFC(momentum_dtype=
FP8, memory_dtype=FP8)``, config ``head.momentum_dtype`` / ``head.vpl_memory_dtype``), the two
auxiliary rows are stored as fp8 + a per-row float32 scale and the timestamp as int32:

    weight (bf16)                       512 × 2      = 1,024 B
    momentum (fp8 + fp32 scale)         512 × 1 + 4  =   516 B
    VPL bank (fp8 + fp32 scale)         512 × 1 + 4  =   516 B
    VPL timestamp (int32)                              =     4 B
                                                          2,060 B per class (≤ 2,100; 61.8 GB at 30M)

The weight stays in its storage dtype: it IS the prototype, every logit reads it, and its update
``lr·m`` is small against it, so a 3-bit mantissa would round most updates away.

Scaling (absmax per row): ``scale_j = max_i |v_ji| / 448`` and ``q_ji = fp8(v_ji / scale_j)``, so
the row's largest entry lands on e4m3fn's largest finite value (448) and every entry keeps e4m3's
relative precision (3 mantissa bits: a rounding error ≤ 2⁻⁴ of the entry, RMS ≈ 2.5 % over a row);
entries below ``absmax·2⁻⁹/448`` (1 / 229,000 of the row's largest) flush to zero. Dequantised:
``v̂_ji = float(q_ji)·scale_j``. A row is quantised when it is written and dequantised when it is
read; a step reads and writes only its sampled rows, so the cost stays O(sampled classes). The
scale is float32 (4 B, not bf16's 2 B) so that it adds no error of its own: the row error is the
fp8 rounding alone.

Why each part tolerates it:
- VPL bank: the rows are unit-norm features (detached; a 2.5 % RMS error on M_j), and they enter a
  prototype only as ``normalize((1−λ)·normalize(W_j) + λ·M_j)`` with λ = 0.15: the prototype moves
  by ≈ λ·2.5 % ≈ 0.4 % of its norm, in a random direction (round-to-nearest is unbiased across a
  row), i.e. an angle of ≈ 0.2° — less than the bank's own staleness (up to Δt = 200 steps old).
- SGD momentum: a running average ``m ← μ·m + g``; each write adds an independent ≈ 2.5 % RMS error
  that then decays by μ per step, so the error in m stays ≈ 2.5 %/√(1−μ²) ≈ 6 % RMS at μ = 0.9 and
  is unbiased — a perturbation of the update's size, far below the gradient noise of a sampled
  batch. The update of the step that writes m uses the unquantised m (the value is in hand).
  This is the block-wise 8-bit optimizer state of Dettmers et al. (ICLR 2022) with one block per
  row (512 entries, finer than their 2,048).
- Timestamps: the step t_j is compared as ``t − t_j ≤ Δt``; int32 holds steps up to 2³¹−1 ≈ 2.1·10⁹
  (6.8 years at 10 steps/s). The head refuses to go past that instead of wrapping.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
TIMESTAMP_DTYPE = torch.int32
TIMESTAMP_MAX = torch.iinfo(TIMESTAMP_DTYPE).max


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` [N, D] (any float dtype) → (fp8 rows [N, D], float32 scales [N]): absmax scaling per
    row, computed in float32. An all-zero row gets scale 0 (and dequantises to exact zeros)."""
    v = values.detach().to(torch.float32)
    scale = v.abs().amax(dim=1) / FP8_MAX if v.numel() else v.new_zeros(v.shape[0])
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    # q = v / scale ∈ [−448, 448]; the clamp only guards against the division rounding up past 448.
    q = (v / divisor).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v̂ = float(q)·scale`` per row, in ``dtype`` (float32 or float64: exact, both hold every fp8
    value times a float32 scale to within one rounding of ``dtype``)."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(1)


def write_rows(data: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> None:
    """Quantise ``values`` into rows ``rows`` of (``data``, ``scale``) (all rows if None). CPU torch has
    no fp8 ``index_copy_``; the rows are moved as their bytes (a uint8 view), which is exact."""
    q, s = quantize_rows(values)
    if rows is None:
        data.view(torch.uint8).copy_(q.view(torch.uint8))
        scale.copy_(s)
    else:
        data.view(torch.uint8).index_copy_(0, rows, q.view(torch.uint8))
        scale.index_copy_(0, rows, s)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of the same dtype and shape (fp8 included: CPU torch has no
    ``torch.equal`` for fp8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == FP8:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def check_compact_dtype(name: str, dtype: torch.dtype | None) -> None:
    """``None`` (the storage dtype, today's layout) or fp8 e4m3fn; anything else names the argument."""
    if dtype is not None and dtype != FP8:
        raise ValueError(f"{name} must be None (the storage dtype) or torch.float8_e4m3fn (fp8 rows with a "
                         f"float32 scale per row), got {dtype}")
