"""PartialFC against the float64 single-process reference at world sizes 1, 2 and 4 (gloo, CPU).

One spawn per world size runs every scenario (margins × dtypes, sampling + optimizer, VPL, bad
input) and returns plain results; the tests below compare them with tests/head_reference.py.
The margin, sampling and VPL scenarios run twice: with the default ``chunk_rows`` (every column in
one chunk at these sizes) and with ``chunk_rows=2``, so the chunked build/recompute path of
heads/prototypes.py (several chunks, VPL-fresh columns in several of them) meets the same reference.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from fr_train.heads import CombinedMargin, PartialFC, VPLConfig, class_shard, scale_backbone_grad
from tests.distributed import run_distributed
from tests.head_reference import (
    PRESETS,
    RESUME,
    SIZES,
    ReferenceVPL,
    global_batch,
    local_slice,
    pack,
    ref_margin,
    reference_grads,
    reference_loss,
    rel_err,
    resume_batch,
    resume_head,
    resume_states_for,
    unpack,
)

WORLDS = [1, 2, 4]
TOL = {torch.float64: 1e-5, torch.float32: 1e-3}
CHUNKS = {"one_chunk": None, "chunks_of_2": 2}  # PartialFC(chunk_rows=...): None = the default
SAMPLING = {"classes": 40, "rate": 0.5, "lr": 0.1, "momentum": 0.9, "wd": 5e-4, "steps": 2}
VPL_CFG = VPLConfig(lambda_=0.3, delta_t=1, start_iter=1)
VPL_STEPS = 4
VPL_CASES = {"rate1_f64": (13, 1.0, torch.float64), "rate1_f32": (13, 1.0, torch.float32),
             "sampled_f64": (24, 0.6, torch.float64)}


def _step(head: PartialFC, batch: dict[str, torch.Tensor], rank: int, sizes: list[int], dtype: torch.dtype) -> dict:
    x = local_slice(batch["x"], rank, sizes).to(dtype).requires_grad_(True)
    loss = head(x, local_slice(batch["labels"], rank, sizes))
    loss.backward()
    grad = head.weight.grad
    return {
        "loss": float(loss.detach()), "x_grad": x.grad.double(), "w_grad_sparse": bool(grad.is_sparse),
        "w_grad": grad.to_dense().double(), "b_grad": None if head.bias is None else head.bias.grad.to_dense().double(),
        "sampled": head.last_sampled_classes.clone(),
    }


def _chunk_kw(chunk: str) -> dict[str, int]:
    return {} if CHUNKS[chunk] is None else {"chunk_rows": CHUNKS[chunk]}


def _margins(rank: int, world: int, chunk: str) -> dict:
    out = {}
    sizes = SIZES[world]
    for k, (name, margin) in enumerate(PRESETS.items()):
        for dtype in (torch.float64, torch.float32):
            batch = global_batch(100 + k, 13, 8, sum(sizes))
            head = PartialFC(13, 8, margin, storage_dtype=dtype, **_chunk_kw(chunk))
            with torch.no_grad():
                head.weight.copy_(batch["weight"][head.class_start : head.class_end])
                if head.bias is not None:
                    head.bias.copy_(batch["bias"][head.class_start : head.class_end])
            out[(name, str(dtype))] = _step(head, batch, rank, sizes, dtype)
    return out


def _sampling(rank: int, world: int, chunk: str) -> dict:
    sizes, c = SIZES[world], SAMPLING["classes"]
    head = PartialFC(c, 8, CombinedMargin.arcface(), sample_rate=SAMPLING["rate"], storage_dtype=torch.float64, seed=5,
                     **_chunk_kw(chunk))
    opt = head.make_optimizer(SAMPLING["lr"], SAMPLING["momentum"], SAMPLING["wd"])
    steps = []
    for step in range(SAMPLING["steps"]):
        batch = global_batch(200 + step, c, 8, sum(sizes))
        before = head.weight.detach().clone()
        result = _step(head, batch, rank, sizes, torch.float64)
        opt.step()
        opt.zero_grad()
        result.update(before=before, after=head.weight.detach().clone(),
                      momentum=opt.state[head.weight]["momentum_buffer"].clone())
        steps.append(result)
    return {"steps": steps, "num_local": head.num_local}


def _vpl(rank: int, world: int, chunk: str) -> dict:
    out = {}
    sizes = SIZES[world]
    for name, (c, rate, dtype) in VPL_CASES.items():
        head = PartialFC(c, 8, CombinedMargin.arcface(), sample_rate=rate, vpl=VPL_CFG, storage_dtype=dtype, seed=3,
                         **_chunk_kw(chunk))
        steps = []
        for step in range(VPL_STEPS):
            batch = global_batch(300 + step, c, 8, sum(sizes), label_range=c // 2)  # duplicates in the batch
            if step == 0:
                with torch.no_grad():
                    head.weight.copy_(batch["weight"][head.class_start : head.class_end])
            head.weight.grad = None
            steps.append(_step(head, batch, rank, sizes, dtype))
        out[name] = {"steps": steps, "memory": head.vpl_memory.double().clone(),
                     "memory_iter": head.vpl_memory_iter.clone(), "iteration": head.iteration,
                     "memory_requires_grad": head.vpl_memory.requires_grad}
    return out


def _errors(rank: int, world: int) -> dict:
    sizes, last = SIZES[world], world - 1
    batch = global_batch(400, 13, 8, sum(sizes))
    head = PartialFC(13, 8, CombinedMargin.cosface())
    cases = {}
    for case in ("label_out_of_range", "nan_embedding", "wrong_dim", "float_labels"):
        x = local_slice(batch["x"], rank, sizes).float()
        y = local_slice(batch["labels"], rank, sizes).clone()
        if case == "label_out_of_range" and rank == last:
            y = torch.cat([y, torch.tensor([13 + 4])])
            x = torch.cat([x, torch.ones(1, 8)])
        if case == "nan_embedding" and rank == 0:
            x[0, 3] = float("nan")
        if case == "wrong_dim" and rank == last:
            x = torch.zeros(x.shape[0], 9)
        if case == "float_labels" and rank == 0:
            y = y.float()
        try:
            head(x, y)
            cases[case] = None
        except ValueError as e:
            cases[case] = str(e)
    # The group is still in step after the errors: a good batch goes through.
    ok = head(local_slice(batch["x"], rank, sizes).float(), local_slice(batch["labels"], rank, sizes))
    return {"errors": cases, "loss_after_errors": float(ok)}


def _data_parallel(rank: int, world: int) -> dict:
    """A replicated linear 'backbone' whose gradients are AVERAGED over ranks (as DeepSpeed/DDP do),
    feeding the head through scale_backbone_grad(emb, world)."""
    sizes = SIZES[world]
    batch = global_batch(600, 13, 8, sum(sizes))
    backbone = torch.nn.Linear(8, 8, dtype=torch.float64)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(8, dtype=torch.float64) + 0.1 * batch["weight"][:8])
        backbone.bias.zero_()
    head = PartialFC(13, 8, CombinedMargin.arcface(), storage_dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(batch["weight"][head.class_start : head.class_end])
    emb = backbone(local_slice(batch["x"], rank, sizes))
    loss = head(scale_backbone_grad(emb, world), local_slice(batch["labels"], rank, sizes))
    loss.backward()
    grad = backbone.weight.grad.clone()
    if world > 1:
        torch.distributed.all_reduce(grad)
        grad /= world  # the data-parallel average
    return {"loss": float(loss.detach()), "backbone_grad": grad, "head_grad": head.weight.grad.clone()}


def _resume(rank: int, world: int, states: list[bytes]) -> dict:
    """Load a resharded head state (see test_head_reshard.py) and take the next training step."""
    head = resume_head()
    opt = head.make_optimizer(**RESUME["optimizer"])
    head.load_state_dict(unpack(states[rank]))
    batch = resume_batch(head.iteration + 1)
    sizes = SIZES[world]
    x = local_slice(batch["x"], rank, sizes).requires_grad_(True)
    loss = head(x, local_slice(batch["labels"], rank, sizes))
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach()), "x_grad": x.grad, "state": head.state_dict()}


def _rank_all(rank: int, world: int, resume_states: list[bytes] | None) -> bytes:
    if world not in WORLDS:  # the extra world size of the reshard chain
        return pack({"resume": _resume(rank, world, resume_states)})
    return pack({"margins": {k: _margins(rank, world, k) for k in CHUNKS},
                 "sampling": {k: _sampling(rank, world, k) for k in CHUNKS},
                 "vpl": {k: _vpl(rank, world, k) for k in CHUNKS}, "errors": _errors(rank, world), "dp": _data_parallel(rank, world),
                 "resume": None if resume_states is None else _resume(rank, world, resume_states)})


@functools.cache
def results(world: int) -> list[dict[str, Any]]:
    """Every rank's results at ``world`` (one spawn, cached for all tests of this session)."""
    states = resume_states_for(world)
    return [unpack(r) for r in run_distributed(_rank_all, world, states, timeout=300)]



def _cat(ranks: list[dict], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in ranks])


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_loss_and_gradients_match_full_softmax_reference(world: int, dtype: torch.dtype, preset: str, chunk: str) -> None:
    """Every margin preset: loss (same on all ranks), d/d embeddings and d/d prototypes equal the
    float64 full-softmax reference, with uneven local batches (an empty rank at world 4)."""
    sizes = SIZES[world]
    k = list(PRESETS).index(preset)
    batch = global_batch(100 + k, 13, 8, sum(sizes))
    ranks = [r["margins"][chunk][(preset, str(dtype))] for r in results(world)]
    loss, gx, gw, gb = reference_grads(batch["x"], batch["weight"], batch["labels"], ref_margin(PRESETS[preset]),
                                       bias=batch["bias"] if PRESETS[preset].linear else None)
    tol = TOL[dtype]
    assert all(r["loss"] == ranks[0]["loss"] for r in ranks), "the loss must be identical on every rank"
    assert rel_err(ranks[0]["loss"], loss) < tol
    assert rel_err(_cat(ranks, "x_grad"), gx) < tol
    assert not any(r["w_grad_sparse"] for r in ranks), "sample_rate=1 gives a dense shard gradient"
    assert rel_err(_cat(ranks, "w_grad"), gw) < tol
    if gb is not None:
        assert rel_err(_cat(ranks, "b_grad"), gb) < tol


@pytest.mark.parametrize("world", WORLDS)
def test_sampling_keeps_positives_and_the_stated_count(world: int) -> None:
    """Each owner samples every positive class of the global batch it owns, and exactly
    max(#positives, ceil(rate·num_local)) classes, sorted and inside its class range."""
    sizes, c = SIZES[world], SAMPLING["classes"]
    for step in range(SAMPLING["steps"]):
        labels = global_batch(200 + step, c, 8, sum(sizes))["labels"]
        for rank, r in enumerate(results(world)):
            shard = class_shard(c, world, rank)
            sampled = r["sampling"]["one_chunk"]["steps"][step]["sampled"]
            owned = {int(y) for y in labels if shard.class_start <= y < shard.class_end}
            assert owned <= set(sampled.tolist())
            want = min(shard.num_local, max(len(owned), math.ceil(SAMPLING["rate"] * shard.num_local)))
            assert sampled.numel() == want
            assert torch.equal(sampled, sampled.sort().values) and len(set(sampled.tolist())) == want
            assert sampled.min() >= shard.class_start and sampled.max() < shard.class_end


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("world", WORLDS)
def test_sampled_loss_equals_reference_softmax_over_sampled_columns(world: int, chunk: str) -> None:
    """Loss and gradients equal the reference restricted to the union of sampled columns; the shard
    gradient is a sparse tensor whose rows are the sampled classes."""
    sizes, c = SIZES[world], SAMPLING["classes"]
    ranks = results(world)
    for step in range(SAMPLING["steps"]):
        batch = global_batch(200 + step, c, 8, sum(sizes))
        per = [r["sampling"][chunk]["steps"][step] for r in ranks]
        columns = torch.cat([p["sampled"] for p in per])
        weight = torch.cat([p["before"] for p in per])
        loss, gx, gw, _ = reference_grads(batch["x"], weight, batch["labels"], ref_margin(CombinedMargin.arcface()),
                                          columns=columns)
        assert all(p["loss"] == per[0]["loss"] for p in per)
        assert rel_err(per[0]["loss"], loss) < 1e-5
        assert rel_err(_cat(per, "x_grad"), gx) < 1e-5
        assert rel_err(_cat(per, "w_grad"), gw) < 1e-5
        assert all(p["w_grad_sparse"] for p in per if p["sampled"].numel() < ranks[0]["sampling"][chunk]["num_local"] or world > 1)


@pytest.mark.parametrize("world", WORLDS)
def test_optimizer_step_moves_only_sampled_rows(world: int) -> None:
    """After the second step, unsampled rows and their momentum are exactly as after the first; the
    sampled rows follow SGD (momentum, weight decay) with the reference gradient."""
    sizes, c = SIZES[world], SAMPLING["classes"]
    first, second = ([r["sampling"]["chunks_of_2"]["steps"][s] for r in results(world)] for s in (0, 1))
    lr, mom, wd = SAMPLING["lr"], SAMPLING["momentum"], SAMPLING["wd"]
    batch = global_batch(201, c, 8, sum(sizes))
    columns = torch.cat([p["sampled"] for p in second])
    w1 = torch.cat([p["after"] for p in first])
    _, _, gw, _ = reference_grads(batch["x"], w1, batch["labels"], ref_margin(CombinedMargin.arcface()), columns=columns)
    w2, buf1, buf2 = (torch.cat([p[k] for p in ps]) for k, ps in (("after", second), ("momentum", first), ("momentum", second)))
    unsampled = torch.ones(c, dtype=torch.bool)
    unsampled[columns] = False
    assert unsampled.any()
    assert torch.equal(w2[unsampled], w1[unsampled]) and torch.equal(buf2[unsampled], buf1[unsampled])
    want_buf = mom * buf1[columns] + gw[columns] + wd * w1[columns]
    assert rel_err(buf2[columns], want_buf) < 1e-10
    assert rel_err(w2[columns], w1[columns] - lr * want_buf) < 1e-10


def _vpl_reference(world: int, name: str) -> tuple[list[tuple[float, torch.Tensor, torch.Tensor]], ReferenceVPL]:
    c, _, dtype = VPL_CASES[name]
    sizes = SIZES[world]
    init = PartialFC(c, 8, CombinedMargin.arcface(), vpl=VPL_CFG, storage_dtype=dtype, seed=3).vpl_memory
    ref = ReferenceVPL(init, VPL_CFG.lambda_, VPL_CFG.delta_t, VPL_CFG.start_iter)
    ranks = [r["vpl"]["one_chunk"][name] for r in results(world)]
    weight = global_batch(300, c, 8, sum(sizes))["weight"]
    out = []
    for step in range(VPL_STEPS):
        batch = global_batch(300 + step, c, 8, sum(sizes), label_range=c // 2)
        columns = torch.cat([r["steps"][step]["sampled"] for r in ranks])
        out.append(ref.step_grads(batch["x"], weight, batch["labels"], ref_margin(CombinedMargin.arcface()),
                                  step + 1, columns=columns))
    return out, ref


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(VPL_CASES))
def test_vpl_matches_reference_over_several_steps(world: int, case: str, chunk: str) -> None:
    """VPL loss and gradients equal the reference step by step (injection only after start_iter and
    for classes written within Δt; step t uses the memory of steps < t), also with sampling."""
    dtype = VPL_CASES[case][2]
    reference, _ = _vpl_reference(world, case)
    ranks = [r["vpl"][chunk][case] for r in results(world)]
    for step, (loss, gx, gw) in enumerate(reference):
        per = [r["steps"][step] for r in ranks]
        assert all(p["loss"] == per[0]["loss"] for p in per)
        assert rel_err(per[0]["loss"], loss) < TOL[dtype], f"step {step + 1}"
        assert rel_err(_cat(per, "x_grad"), gx) < TOL[dtype], f"step {step + 1}"
        assert rel_err(_cat(per, "w_grad"), gw) < TOL[dtype], f"step {step + 1}"


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(VPL_CASES))
def test_vpl_memory_holds_latest_feature_of_each_class(world: int, case: str, chunk: str) -> None:
    """After the steps the sharded bank equals the reference bank: the normalised feature of the LAST
    sample of each class in global batch order, with the step it was written; untouched classes keep
    their random init and t_j = −1; the bank is a buffer that never takes gradient."""
    dtype = VPL_CASES[case][2]
    _, ref = _vpl_reference(world, case)
    ranks = [r["vpl"][chunk][case] for r in results(world)]
    memory, memory_iter = _cat(ranks, "memory"), _cat(ranks, "memory_iter")
    assert torch.equal(memory_iter, ref.memory_iter)
    assert rel_err(memory, ref.memory) < TOL[dtype]
    assert (memory_iter == -1).any(), "some classes are never seen (labels drawn from half the classes)"
    assert all(r["iteration"] == VPL_STEPS and not r["memory_requires_grad"] for r in ranks)


@pytest.mark.parametrize("world", WORLDS)
def test_vpl_last_sample_of_a_class_wins(world: int) -> None:
    """With duplicate labels in the final batch, the bank row is the feature of the later sample."""
    c = VPL_CASES["rate1_f64"][0]
    batch = global_batch(300 + VPL_STEPS - 1, c, 8, sum(SIZES[world]), label_range=c // 2)
    labels = batch["labels"].tolist()
    dup = next(y for y in labels if labels.count(y) > 1)
    last = max(i for i, y in enumerate(labels) if y == dup)
    memory = _cat([r["vpl"]["chunks_of_2"]["rate1_f64"] for r in results(world)], "memory")
    assert rel_err(memory[dup], torch.nn.functional.normalize(batch["x"][last], dim=0)) < 1e-12


@pytest.mark.parametrize("world", WORLDS)
def test_bad_input_raises_the_same_clear_error_on_every_rank(world: int) -> None:
    """Out-of-range labels, NaN embeddings, a wrong embedding size and float labels raise a
    ValueError on EVERY rank (no hang) naming the rank and the problem; the group stays usable."""
    ranks = [r["errors"] for r in results(world)]
    last = world - 1
    expected = {
        "label_out_of_range": f"rank {last}: 1 label(s) outside [0, 13) (range seen 17..17)",
        "nan_embedding": "rank 0: 1 embedding row(s) contain NaN or inf",
        "wrong_dim": f"rank {last}: embeddings must be [batch, 8]",
        "float_labels": "rank 0: labels must be a 1-d integer tensor",
    }
    for case, fragment in expected.items():
        messages = [r["errors"][case] for r in ranks]
        assert all(m is not None and fragment in m for m in messages), (case, messages)
        assert len(set(messages)) == 1
    assert all(math.isfinite(r["loss_after_errors"]) for r in ranks)


@pytest.mark.parametrize("world", WORLDS)
def test_data_parallel_backbone_gets_the_global_mean_gradient(world: int) -> None:
    """The documented contract: with scale_backbone_grad(emb, W) before the head and the backbone's
    gradients AVERAGED over ranks, the backbone gets d(global mean loss)/dθ and the head's shard
    gradient is unscaled."""
    sizes = SIZES[world]
    batch = global_batch(600, 13, 8, sum(sizes))
    lin = torch.nn.Linear(8, 8, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(8, dtype=torch.float64) + 0.1 * batch["weight"][:8])
        lin.bias.zero_()
    w = batch["weight"].clone().requires_grad_(True)
    loss = reference_loss(lin(batch["x"]), w, batch["labels"], ref_margin(CombinedMargin.arcface()))
    loss.backward()
    ranks = [r["dp"] for r in results(world)]
    for r in ranks:
        assert rel_err(r["backbone_grad"], lin.weight.grad) < 1e-10
    assert rel_err(torch.cat([r["head_grad"] for r in ranks]), w.grad) < 1e-10
