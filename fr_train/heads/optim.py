"""Row-sparse optimizers for the head: a step touches only the rows that received gradient.

Partial FC samples a fraction of the classes each step; the head's gradient is a sparse COO
tensor whose rows are the sampled classes. ``torch.optim.SGD`` would densify it and move every
row (weight decay and momentum on rows that were not sampled), which costs O(all classes) per
step. These optimizers read, update and write back only the sampled rows, keeping per-row state
(momentum rows; for AdamW also per-row step counts, so bias correction counts the steps each row
actually took). With a dense gradient (sample_rate 1) every row is a sampled row and the update
is exactly ``torch.optim.SGD(momentum, weight_decay, dampening=0)`` / ``torch.optim.AdamW``.

Both subclass ``torch.optim.Optimizer``: ``param_groups[0]["lr"]`` is what an LR scheduler sets,
and ``state_dict``/``load_state_dict``/``zero_grad`` behave as usual. Rows may be stored in bf16;
the update is computed in fp32 (fp64 for fp64 parameters) and rounded back on write.

SGD's momentum may instead be stored compact (``state_dtype=torch.float8_e4m3fn``): fp8 rows plus a
float32 scale per row (state keys ``momentum_buffer`` and ``momentum_scale``), dequantised when a
row is read and quantised when it is written (heads/compact.py says why a running average tolerates
it). Only matrix parameters get fp8 rows; a 1-d parameter (the softmax preset's bias: one value per
class) keeps its momentum in its own dtype, since a 4-byte scale per entry would cost more than fp8
saves. AdamW refuses fp8 state: its second moment spans g² over many decades, which one scale per
row would flush to zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fr_train.heads.compact import FP8, dequantize_rows, write_rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-row vector so it broadcasts over ``like``'s trailing dims."""
    return t.view(-1, *([1] * (like.dim() - 1)))


class _Rows:
    """Read the given rows of ``t`` (all rows if ``rows`` is None) in ``dtype``; write them back."""

    def __init__(self, t: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.t, self.rows = t, rows
        src = t if rows is None else t.index_select(0, rows)
        self.inplace = rows is None and t.dtype == dtype
        self.value = src if self.inplace else src.to(dtype)

    def write(self) -> None:
        if self.inplace:
            return
        if self.rows is None:
            self.t.copy_(self.value)
        else:
            self.t.index_copy_(0, self.rows, self.value.to(self.t.dtype))


class _QuantRows:
    """``_Rows`` for fp8 state: the given rows of (``data``, ``scale``) dequantised to ``dtype``;
    ``write`` quantises them back (heads/compact.py)."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.data, self.scale, self.rows = data, scale, rows
        q, s = (data, scale) if rows is None else (data.index_select(0, rows), scale.index_select(0, rows))
        self.value = dequantize_rows(q, s, dtype)

    def write(self) -> None:
        write_rows(self.data, self.scale, self.rows, self.value)


CHUNK_ROWS = 1 << 16  # rows updated at a time: bounds the optimizer's temporaries for huge samples


def _sampled_grad(p: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """(rows, gradient rows) chunks of ``p.grad``; rows None when the gradient is dense."""
    g = p.grad
    if g is None:
        return []
    if not g.is_sparse:
        return [(None, g)]
    g = g.coalesce()
    rows, values = g.indices()[0], g.values()
    return [(rows[i : i + CHUNK_ROWS], values[i : i + CHUNK_ROWS]) for i in range(0, rows.numel(), CHUNK_ROWS)]


class _RowSparseOptimizer(torch.optim.Optimizer):
    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], defaults: dict) -> None:
        self.param_names = [name for name, _ in named_params]
        super().__init__([p for _, p in named_params], defaults)

    def row_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-row state tensors by parameter name (first dim = the shard's rows) for resharding."""
        params = self.param_groups[0]["params"]
        return {name: dict(self.state[p]) for name, p in zip(self.param_names, params, strict=True)}

    def load_row_state(self, rows: dict[str, dict[str, torch.Tensor]]) -> None:
        params = self.param_groups[0]["params"]
        for name, p in zip(self.param_names, params, strict=True):
            if name not in rows:
                raise KeyError(f"optimizer state has no rows for parameter {name!r} (has {sorted(rows)})")
            for key, current in self.state[p].items():
                if key not in rows[name]:
                    raise KeyError(f"optimizer state of {name!r} lacks {key!r} (has {sorted(rows[name])})")
                value = rows[name][key]
                if FP8 in (value.dtype, current.dtype) and value.dtype != current.dtype:
                    raise ValueError(
                        f"optimizer state {name}.{key} is {value.dtype}, this optimizer keeps {current.dtype}: "
                        "the checkpoint was written with another head.momentum_dtype; resume with the same one"
                    )
                if value.shape != current.shape:
                    raise ValueError(
                        f"optimizer state {name}.{key} has shape {tuple(value.shape)}, this shard needs "
                        f"{tuple(current.shape)}: the checkpoint belongs to another class range; reshard it"
                    )
                current.copy_(value)


class RowSparseSGD(_RowSparseOptimizer):
    """SGD with momentum and (coupled, L2) weight decay on the sampled rows only. ``state_dtype``:
    the momentum rows' dtype (None: the parameter's; ``torch.float8_e4m3fn``: compact, module doc)."""

    kind = "sgd"

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum, weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        if state_dtype == FP8 and momentum == 0:
            raise ValueError("fp8 momentum (state_dtype=torch.float8_e4m3fn) needs momentum > 0: there is no "
                             "momentum to store")
        super().__init__(named_params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov})
        for p in self.param_groups[0]["params"]:
            if momentum > 0 and state_dtype == FP8 and p.dim() == 2:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=FP8)
                self.state[p]["momentum_scale"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            elif momentum > 0:
                dtype = p.dtype if state_dtype in (None, FP8) else state_dtype
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=dtype)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("RowSparseSGD.step takes no closure")
        for group in self.param_groups:
            lr, momentum, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            for p, (rows, grad) in ((q, chunk) for q in group["params"] for chunk in _sampled_grad(q)):
                cdt = _compute_dtype(p.dtype)
                w = _Rows(p.data, rows, cdt)
                d = grad.to(cdt)
                if wd:
                    d = d.add(w.value, alpha=wd)
                if momentum > 0:
                    state = self.state[p]
                    buf: _Rows | _QuantRows = (
                        _QuantRows(state["momentum_buffer"], state["momentum_scale"], rows, cdt)
                        if "momentum_scale" in state else _Rows(state["momentum_buffer"], rows, cdt)
                    )
                    buf.value.mul_(momentum).add_(d)  # first step: 0·m + d = d, as torch.optim.SGD
                    buf.write()
                    d = d.add(buf.value, alpha=momentum) if nesterov else buf.value
                w.value.add_(d, alpha=-lr)
                w.write()


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW (decoupled weight decay) on the sampled rows, with per-row step counts."""

    kind = "adamw"

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if lr < 0 or weight_decay < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        if state_dtype == FP8:
            raise ValueError("RowSparseAdamW keeps no fp8 state (exp_avg_sq spans too many decades for one scale "
                             "per row); use state_dtype None/bfloat16, or SGD for head.momentum_dtype=float8_e4m3fn")
        super().__init__(named_params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for p in self.param_groups[0]["params"]:
            self.state[p]["exp_avg"] = torch.zeros_like(p, dtype=state_dtype or p.dtype)
            self.state[p]["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype or p.dtype)
            self.state[p]["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("RowSparseAdamW.step takes no closure")
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p, (rows, grad) in ((q, chunk) for q in group["params"] for chunk in _sampled_grad(q)):
                cdt = _compute_dtype(p.dtype)
                state = self.state[p]
                w = _Rows(p.data, rows, cdt)
                m = _Rows(state["exp_avg"], rows, cdt)
                v = _Rows(state["exp_avg_sq"], rows, cdt)
                g = grad.to(cdt)
                if rows is None:
                    state["row_step"] += 1
                    step = state["row_step"]
                else:
                    step = state["row_step"].index_select(0, rows) + 1
                    state["row_step"].index_copy_(0, rows, step)
                w.value.mul_(1.0 - lr * wd)
                m.value.lerp_(g, 1.0 - beta1)
                v.value.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                step_f = step.to(cdt)
                bias1 = 1.0 - torch.pow(beta1, step_f)
                bias2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, step_f))
                denom = (v.value.sqrt() / _row_view(bias2_sqrt, v.value)).add_(eps)
                w.value.add_((m.value / denom).mul_(_row_view(-lr / bias1, m.value)))
                m.write()
                v.write()
                w.write()


HeadOptimizer = RowSparseSGD | RowSparseAdamW
