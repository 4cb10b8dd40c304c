"""What one PartialFC step keeps in memory per sampled column (heads/prototypes.py).

Between forward and backward the margin-softmax head keeps the ``B × S`` softmax and a few bytes
of indices per column, never a ``[S, D]`` copy of the sampled rows (autograd through the prototype
construction kept about five): that is what lets 30M classes with VPL fit one 80 GB GPU
(benchmarks/head.py --memory). The row gradient comes back in the storage dtype, sparse over the
sampled rows. The chunked path computes what the one-chunk path computes (the float64 references
of every scenario at W = 1, 2, 4 run in chunks of 2 in test_head_partial_fc.py); here: the GPU's
configuration (bf16 rows, compact fp8 state, VPL injecting) over several optimizer steps.
"""

from __future__ import annotations

import torch

from fr_train.heads import CombinedMargin, PartialFC, VPLConfig
from fr_train.heads.compact import FP8

CLASSES, DIM, BATCH, RATE = 600, 32, 16, 0.5
VPL = VPLConfig(lambda_=0.2, delta_t=3, start_iter=1)


def _head(**kw: object) -> PartialFC:
    head = PartialFC(CLASSES, DIM, CombinedMargin.arcface(), sample_rate=RATE, vpl=VPL, seed=4,
                     storage_dtype=torch.bfloat16, momentum_dtype=FP8, memory_dtype=FP8, **kw)  # type: ignore[arg-type]
    head.make_optimizer(0.1, momentum=0.9, weight_decay=5e-4)
    return head


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, DIM, generator=gen)
    y = torch.randint(0, CLASSES // 10, (BATCH,), generator=gen)  # few classes: VPL rows stay fresh
    return x, y


def _kept_by(grad_fn: object) -> list[torch.Tensor]:
    """Every tensor the loss's backward node holds outside ``save_for_backward``: its context's
    attributes, and the fields of the objects among them (the step's prototype columns)."""
    out: list[torch.Tensor] = []
    for value in vars(grad_fn).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif hasattr(value, "__dict__"):
            out += [v for v in vars(value).values() if isinstance(v, torch.Tensor)]
    return out


def test_between_forward_and_backward_no_copy_of_the_sampled_rows_is_kept() -> None:
    head = _head()
    for step in range(3):  # past start_iter, with fresh memory rows
        x, y = _batch(step)
        head(x, y).backward()
        head.optimizer.step()  # type: ignore[union-attr]
        head.optimizer.zero_grad()  # type: ignore[union-attr]
    saved: list[torch.Tensor] = []
    x, y = _batch(3)
    x.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = head(x, y)
    sampled = head.last_sampled_classes.numel()  # type: ignore[union-attr]
    assert float(head.last_vpl_injected) > 0, "the step must inject VPL memory for this to test it"
    assert sampled * DIM > 4 * BATCH * DIM, "the sampled rows must outweigh the batch for this to test it"
    own = {t.untyped_storage().data_ptr() for t in [*head.parameters(), *head.buffers()]}
    kept = [t for t in saved + _kept_by(loss.grad_fn) if t.untyped_storage().data_ptr() not in own]
    shapes = [tuple(t.shape) for t in kept]
    # Per sampled column: the softmax (B floats) and a few indices; per injecting column its memory
    # row; the rest is batch-sized. No [S, D] copy of the sampled rows.
    assert not any(t.numel() >= sampled * DIM for t in kept), shapes
    assert sum(t.numel() * t.element_size() for t in kept) < sampled * (4 * BATCH + 32) + 8 * BATCH * DIM * 4, shapes
    loss.backward()
    grad = head.weight.grad
    assert grad is not None and grad.is_sparse and grad.dtype == torch.bfloat16
    assert grad._nnz() == sampled and grad._values().shape == (sampled, DIM)


def test_an_in_place_change_of_the_weight_before_backward_is_refused() -> None:
    """Backward rebuilds the prototypes from the stored rows: were they changed in place after the
    forward, autograd's version check refuses instead of differentiating at other weights."""
    head = _head()
    x, y = _batch(0)
    loss = head(x.requires_grad_(True), y)
    with torch.no_grad():
        head.weight.mul_(2)
    try:
        loss.backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
    else:
        raise AssertionError("backward after an in-place change of the weight must raise")


def test_chunks_of_7_columns_train_as_one_chunk_in_the_gpu_configuration() -> None:
    """bf16 rows, fp8 momentum and VPL bank, VPL injecting: 4 steps with SGD in chunks of 7 columns
    (about 43 chunks) track the one-chunk head: the per-column work is the same operations, only
    ``dL/dx`` is summed over chunks in another order (float rounding)."""
    one, chunked = _head(), _head(chunk_rows=7)
    for step in range(4):
        losses, grads = [], []
        for head in (one, chunked):
            x, y = _batch(step)
            x.requires_grad_(True)
            loss = head(x, y)
            loss.backward()
            head.optimizer.step()  # type: ignore[union-attr]
            head.optimizer.zero_grad()  # type: ignore[union-attr]
            losses.append(float(loss.detach()))
            grads.append(x.grad)
        # float32 rounding of sums taken in another order (measured: 2e-7 and 1e-6 of the largest)
        assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0]), f"step {step}: {losses}"
        assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max(), f"step {step}"
    assert float(chunked.last_vpl_injected) > 0
    assert torch.equal(one.last_sampled_classes, chunked.last_sampled_classes)
    diff = (one.weight.float() - chunked.weight.float()).abs().max()
    assert diff <= 2 ** -8 * one.weight.float().abs().max(), "weights within one bf16 rounding"
    assert torch.equal(one.vpl_memory_iter, chunked.vpl_memory_iter)
