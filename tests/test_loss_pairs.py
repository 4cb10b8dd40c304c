"""Triplet and contrastive losses over the global batch against float64 single-process references
at world sizes 1, 2 and 4 (gloo, CPU), with uneven local batches (one rank empty at W=4) and an
anchor without a positive. One spawn per world size runs every case."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from fr_train.losses import ContrastiveLoss, TripletLoss
from tests.distributed import run_distributed
from tests.head_reference import local_slice, pack, rel_err, unpack
from tests.loss_reference import LOSS_SIZES, grads_of, pair_batch, ref_contrastive, ref_triplet

WORLDS = [1, 2, 4]
TOL = 1e-6
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "triplet_batch_hard": ("triplet", {"margin": 0.2, "mining": "batch_hard"}),
    "triplet_semi_hard": ("triplet", {"margin": 0.5, "mining": "semi_hard"}),
    "contrastive": ("contrastive", {"margin": 0.1, "pos_weight": 1.0}),
    "contrastive_weighted": ("contrastive", {"margin": -0.2, "pos_weight": 3.0}),
}


def _make(kind: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    return TripletLoss(**kwargs) if kind == "triplet" else ContrastiveLoss(**kwargs)


def _reference(kind: str, kwargs: dict[str, Any], x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "triplet":
        return ref_triplet(x, labels, kwargs["margin"], kwargs["mining"])
    return ref_contrastive(x, labels, kwargs["margin"], kwargs["pos_weight"])


def _run_cases(rank: int, world: int) -> bytes:
    sizes = LOSS_SIZES[world]
    out = {}
    for k, (name, (kind, kwargs)) in enumerate(CASES.items()):
        batch = pair_batch(10 + k, sum(sizes))
        for dtype in (torch.float64, torch.float32):
            x = local_slice(batch["x"], rank, sizes).to(dtype).requires_grad_(True)
            loss_fn = _make(kind, kwargs)
            loss = loss_fn(x, local_slice(batch["labels"], rank, sizes))
            loss.backward()
            out[(name, str(dtype))] = {"loss": float(loss.detach()), "grad": x.grad.double(),
                                       "valid": getattr(loss_fn, "last_valid", None)}
    # Bad input: one rank sends NaN, every rank raises the same error (nobody hangs).
    x = local_slice(pair_batch(0, sum(sizes))["x"], rank, sizes).clone()
    if rank == 0:
        x[0, 0] = float("nan")
    try:
        TripletLoss()(x, local_slice(pair_batch(0, sum(sizes))["labels"], rank, sizes))
        out["nan_error"] = ""
    except ValueError as exc:
        out["nan_error"] = str(exc)
    return pack(out)


@functools.cache
def _results(world: int) -> list[dict]:
    return [unpack(b) for b in run_distributed(_run_cases, world, timeout=180)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_pair_loss_matches_reference_on_global_batch(world: int, name: str) -> None:
    """Loss identical on every rank and equal to the reference over the concatenated global batch;
    each rank's embedding gradient is its slice of d(global loss)/d(all embeddings)."""
    kind, kwargs = CASES[name]
    sizes = LOSS_SIZES[world]
    batch = pair_batch(10 + list(CASES).index(name), sum(sizes))
    ref_loss, (ref_grad,) = grads_of(lambda x: _reference(kind, kwargs, x, batch["labels"]), batch["x"])
    results = _results(world)
    for dtype, tol in ((torch.float64, TOL), (torch.float32, 1e-4)):
        for rank, res in enumerate(results):
            got = res[(name, str(dtype))]
            assert rel_err(got["loss"], ref_loss) < tol, (dtype, rank, got["loss"], ref_loss)
            assert got["grad"].shape[0] == sizes[rank]
            if sizes[rank]:
                assert rel_err(got["grad"], local_slice(ref_grad, rank, sizes)) < tol, (dtype, rank)
        assert len({r[(name, str(dtype))]["loss"] for r in results}) == 1, "loss differs between ranks"


@pytest.mark.parametrize("world", WORLDS)
def test_triplet_excludes_anchors_without_positive(world: int) -> None:
    """The singleton identity defines no triplet: batch-hard averages over the other anchors only."""
    sizes = LOSS_SIZES[world]
    batch = pair_batch(10, sum(sizes))
    counts = torch.bincount(batch["labels"])
    expected = int((counts[batch["labels"]] > 1).sum())
    assert expected < sum(sizes)
    assert all(r[("triplet_batch_hard", str(torch.float64))]["valid"] == expected for r in _results(world))


@pytest.mark.parametrize("world", WORLDS)
def test_nan_embedding_on_one_rank_raises_on_every_rank(world: int) -> None:
    for res in _results(world):
        assert "rank 0: 1 embedding row(s) contain NaN or inf" in res["nan_error"]


def test_triplet_rejects_unknown_mining() -> None:
    with pytest.raises(ValueError, match="mining must be"):
        TripletLoss(mining="hardest")  # type: ignore[arg-type]
