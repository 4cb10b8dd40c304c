"""Distillation (feature + EKD) over the global batch against a float64 single-process reference at
world sizes 1, 2 and 4 (gloo, CPU; uneven local batches, one rank empty at W=4), over two steps so
that the moving-average FPR thresholds are checked too."""

from __future__ import annotations

import functools

import pytest
import torch

from fr_train.losses import DistillLoss, DistillWeights
from tests.distributed import run_distributed
from tests.head_reference import local_slice, pack, rel_err, unpack
from tests.loss_reference import LOSS_SIZES, grads_of, pair_batch, ref_distill

ANCHORS = (2, 4, 8)  # FPR levels a 10-sample batch resolves
WEIGHTS = DistillWeights(feature=0.5, ekd_pos=2.0, ekd_neg=1.0, ekd_topk=6, ekd_temperature=0.1, ekd_momentum=0.3)
STEPS = 2


def _teacher(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A teacher that sees the same faces a little differently: a fixed rotation plus noise."""
    g = torch.Generator().manual_seed(100 + seed)
    q, _ = torch.linalg.qr(torch.eye(x.shape[1], dtype=torch.float64) + 0.3 * torch.randn(
        x.shape[1], x.shape[1], generator=g, dtype=torch.float64))
    return x @ q + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def _run(rank: int, world: int) -> bytes:
    sizes = LOSS_SIZES[world]
    out = {}
    for dtype in (torch.float64, torch.float32):
        loss_fn = DistillLoss(WEIGHTS, anchors=ANCHORS)
        for step in range(STEPS):
            batch = pair_batch(40 + step, sum(sizes))
            teacher = _teacher(batch["x"], step)
            x = local_slice(batch["x"], rank, sizes).to(dtype).requires_grad_(True)
            loss = loss_fn(x, local_slice(teacher, rank, sizes).to(dtype), local_slice(batch["labels"], rank, sizes))
            loss.backward()
            out[(str(dtype), step)] = {"loss": float(loss.detach()), "grad": x.grad.double(),
                                       "thresholds": loss_fn.student_thresholds.clone()}
    return pack(out)


@functools.cache
def _results(world: int) -> list[dict]:
    return [unpack(b) for b in run_distributed(_run, world, timeout=180)]


def _reference(total: int) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    state: dict = {"student": None, "teacher": None}
    w = {"feature": WEIGHTS.feature, "ekd_pos": WEIGHTS.ekd_pos, "ekd_neg": WEIGHTS.ekd_neg, "topk": WEIGHTS.ekd_topk,
         "temperature": WEIGHTS.ekd_temperature, "momentum": WEIGHTS.ekd_momentum}
    out = []
    for step in range(STEPS):
        batch = pair_batch(40 + step, total)
        teacher = _teacher(batch["x"], step)
        loss, (grad,) = grads_of(functools.partial(_ref_from, teacher=teacher, labels=batch["labels"], w=w,
                                                   state=dict(state)), batch["x"])
        ref_distill(batch["x"], teacher, batch["labels"], w, ANCHORS, state)  # advance the thresholds once
        out.append((loss, grad, state["student"].clone()))
    return out


def _ref_from(x: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, w: dict, state: dict) -> torch.Tensor:
    return ref_distill(x, teacher, labels, w, ANCHORS, dict(state))  # a copy: the caller advances the state


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distillation_matches_the_reference_on_the_global_batch(world: int) -> None:
    sizes = LOSS_SIZES[world]
    reference = _reference(sum(sizes))
    results = _results(world)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        for step, (ref_loss, ref_grad, ref_thresholds) in enumerate(reference):
            losses = {r[(str(dtype), step)]["loss"] for r in results}
            assert len(losses) == 1, f"loss differs between ranks: {losses}"
            for rank, res in enumerate(results):
                got = res[(str(dtype), step)]
                assert rel_err(got["loss"], ref_loss) < tol, (dtype, step, rank, got["loss"], ref_loss)
                assert rel_err(got["thresholds"], ref_thresholds) < tol, (dtype, step)
                if sizes[rank]:
                    assert rel_err(got["grad"], local_slice(ref_grad, rank, sizes)) < tol, (dtype, step, rank)


def test_every_term_moves_the_student() -> None:
    """Each weight switches on a term with a nonzero gradient (none is silently dropped)."""
    torch.manual_seed(0)
    x, t = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    labels = torch.arange(12) % 4
    for weights in (DistillWeights(feature=1.0), DistillWeights(ekd_pos=1.0, ekd_temperature=0.1),
                    DistillWeights(ekd_neg=1.0, ekd_topk=5, ekd_temperature=0.1)):
        xs = x.clone().requires_grad_(True)
        _single(DistillLoss(weights, anchors=ANCHORS), xs, t, labels).backward()
        assert xs.grad is not None and float(xs.grad.abs().sum()) > 0, weights


def _single(loss_fn: DistillLoss, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import os

    import torch.distributed as dist

    from tests.distributed import free_port

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    return loss_fn(x, t, labels)


def test_feature_distillation_refuses_different_embedding_sizes() -> None:
    with pytest.raises(ValueError, match="equal embedding sizes"):
        _single(DistillLoss(DistillWeights(feature=1.0)), torch.randn(4, 8), torch.randn(4, 16),
                torch.tensor([0, 0, 1, 1]))
