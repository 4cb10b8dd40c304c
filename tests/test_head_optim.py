"""The head's row-sparse optimizers: exact torch.optim equivalence at sample_rate 1, untouched
unsampled rows otherwise, LR-scheduler compatibility, bf16 storage."""

from __future__ import annotations

import pytest
import torch

from fr_train.heads import CombinedMargin, PartialFC, RowSparseAdamW, RowSparseSGD, VPLConfig


def _batch(step: int, classes: int = 11, dim: int = 6, n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("margin", [CombinedMargin.arcface(), CombinedMargin.softmax()], ids=["arcface", "softmax"])
def test_rate_one_equals_torch_optimizer_on_the_full_shard(kind: str, margin: CombinedMargin) -> None:
    """Five steps of the head's optimizer == torch.optim.SGD(momentum, wd) / AdamW on weight (+bias)."""
    ours = PartialFC(11, 6, margin, storage_dtype=torch.float64)
    twin = PartialFC(11, 6, margin, storage_dtype=torch.float64)
    opt = ours.make_optimizer(0.3, momentum=0.9, weight_decay=5e-3, kind=kind)
    params = [twin.weight] + ([twin.bias] if twin.bias is not None else [])
    if kind == "sgd":
        ref = torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=5e-3)
    else:
        ref = torch.optim.AdamW(params, lr=0.3, weight_decay=5e-3)
    for step in range(5):
        x, y = _batch(step)
        for head, o in ((ours, opt), (twin, ref)):
            o.zero_grad()
            head(x, y).backward()
            o.step()
        assert torch.allclose(ours.weight, twin.weight, rtol=0, atol=1e-12)
        if ours.bias is not None:
            assert torch.allclose(ours.bias, twin.bias, rtol=0, atol=1e-12)


def test_sparse_gradient_updates_only_its_rows_and_their_state() -> None:
    """SGD on a sparse gradient with rows {1, 3}: those rows follow torch SGD on the same rows;
    every other row and its momentum are bit-identical afterwards."""
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    opt = RowSparseSGD([("weight", w)], lr=0.1, momentum=0.9, weight_decay=1e-2)
    sub = torch.nn.Parameter(w.detach()[[1, 3]].clone())
    ref = torch.optim.SGD([sub], lr=0.1, momentum=0.9, weight_decay=1e-2)
    before = w.detach().clone()
    for _ in range(3):
        g = torch.randn(2, 3, dtype=torch.float64)
        w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), g, (5, 3), check_invariants=True)
        sub.grad = g.clone()
        opt.step()
        ref.step()
    assert torch.allclose(w.detach()[[1, 3]], sub.detach(), rtol=0, atol=1e-14)
    assert torch.equal(w.detach()[[0, 2, 4]], before[[0, 2, 4]])
    assert (opt.state[w]["momentum_buffer"][[0, 2, 4]] == 0).all()


def test_adamw_counts_steps_per_row() -> None:
    """A row updated in 2 of 3 steps has row_step 2, and its update matches AdamW after 2 steps."""
    w = torch.nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
    opt = RowSparseAdamW([("weight", w)], lr=0.05, weight_decay=0.1)
    sub = torch.nn.Parameter(w.detach()[[2]].clone())
    ref = torch.optim.AdamW([sub], lr=0.05, weight_decay=0.1)
    for rows in ([0, 2], [0], [2]):
        g = torch.randn(len(rows), 2, dtype=torch.float64)
        w.grad = torch.sparse_coo_tensor(torch.tensor([rows]), g, (4, 2), check_invariants=True)
        opt.step()
        if 2 in rows:
            sub.grad = g[[rows.index(2)]].clone()
            ref.step()
    assert opt.state[w]["row_step"].tolist() == [2, 0, 2, 0]
    assert torch.allclose(w.detach()[2], sub.detach()[0], rtol=0, atol=1e-14)


def test_an_lr_scheduler_drives_the_head_optimizer() -> None:
    head = PartialFC(11, 6, CombinedMargin.cosface())
    opt = head.make_optimizer(0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 10)
    for step in range(3):
        x, y = _batch(step)
        head(x.float(), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.07)
    opt.param_groups[0]["lr"] = 0.5  # a trainer may also set it directly every step
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.5


def test_bf16_storage_computes_in_fp32_and_trains_sampled_rows() -> None:
    """Prototypes and VPL memory stored in bf16: the loss equals an fp32 head holding the same
    (bf16-rounded) values, and a sampled step only moves sampled rows."""
    vpl = VPLConfig(lambda_=0.2, delta_t=5, start_iter=0)
    small = PartialFC(50, 6, CombinedMargin.arcface(), sample_rate=0.2, vpl=vpl, storage_dtype=torch.bfloat16, seed=1)
    full = PartialFC(50, 6, CombinedMargin.arcface(), vpl=vpl, seed=1)
    with torch.no_grad():
        full.weight.copy_(small.weight.float())
        full.vpl_memory.copy_(small.vpl_memory.float())
    assert small.weight.dtype == torch.bfloat16 and small.vpl_memory.dtype == torch.bfloat16
    x, y = _batch(0, classes=50)
    small.eval()
    full.eval()
    with torch.no_grad():
        assert float(small(x.float(), y)) == pytest.approx(float(full(x.float(), y)), rel=1e-5)
    small.train()
    opt = small.make_optimizer(0.5)
    before = small.weight.detach().clone()
    small(x.float(), y).backward()
    assert small.weight.grad.is_sparse
    opt.step()
    moved = (small.weight.detach() != before).any(dim=1)
    sampled = torch.zeros(50, dtype=torch.bool)
    sampled[small.last_sampled_classes] = True
    assert moved.any() and not (moved & ~sampled).any()
