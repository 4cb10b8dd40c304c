"""BCE-with-unified-bias and UNPG heads against float64 single-process references at world sizes
1, 2 and 4 (gloo, CPU): loss, d/d embeddings, d/d prototypes, d/d unified bias; with Partial-FC
sampling (reference over the union of the sampled classes) and uneven local batches."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from fr_train.heads import CombinedMargin
from fr_train.heads.bce_head import BCEHead
from fr_train.heads.epl_head import EPLHead
from fr_train.heads.unpg_head import UNPGHead, filtered_negative_pairs, linear_quantile
from fr_train.heads.uss_head import USSHead
from tests.distributed import run_distributed
from tests.head_reference import global_batch, local_slice, pack, ref_margin, rel_err, unpack
from tests.loss_reference import (
    LOSS_SIZES,
    box_whisker_keep,
    grads_of,
    ref_bce,
    ref_epl,
    ref_epl_update,
    ref_unpg,
    ref_uss,
    ref_uss_bias_init,
    ref_uss_memory,
    uniface_bias_init,
)

WORLDS = [1, 2, 4]
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
C, D = 13, 8
# name: (head, margin, sample_rate, dtype, extra kwargs)
CASES: dict[str, tuple[str, CombinedMargin, float, torch.dtype, dict[str, Any]]] = {
    "bce_cosface_f64": ("bce", CombinedMargin.cosface(0.4), 1.0, torch.float64, {}),
    "bce_arcface_sampled_f64": ("bce", CombinedMargin.arcface(0.5, s=16.0), 0.5, torch.float64,
                                {"neg_weight": 0.7, "bias_ratio": 0.5}),
    "bce_cosface_f32": ("bce", CombinedMargin.cosface(0.4), 1.0, torch.float32, {}),
    "unpg_arcface_f64": ("unpg", CombinedMargin.arcface(), 1.0, torch.float64, {"whisker": 1.5}),
    "unpg_cosface_sampled_f64": ("unpg", CombinedMargin.cosface(0.5), 0.5, torch.float64, {"whisker": 0.3}),
    "unpg_arcface_f32": ("unpg", CombinedMargin.arcface(), 1.0, torch.float32, {"whisker": 1.0}),
}
SGD = {"lr": 0.5, "momentum": 0.9, "weight_decay": 5e-4}


def _batch(name: str, world: int) -> dict[str, torch.Tensor]:
    return global_batch(700 + list(CASES).index(name), C, D, sum(LOSS_SIZES[world]), label_range=6)


def _make(name: str) -> BCEHead | UNPGHead:
    kind, margin, rate, dtype, kwargs = CASES[name]
    cls = BCEHead if kind == "bce" else UNPGHead
    return cls(C, D, margin, sample_rate=rate, storage_dtype=dtype, seed=11, **kwargs)


def _run_cases(rank: int, world: int) -> bytes:
    sizes = LOSS_SIZES[world]
    out = {}
    for name, (kind, _, _, dtype, _) in CASES.items():
        batch = _batch(name, world)
        head = _make(name)
        opt = head.make_optimizer(**SGD)
        with torch.no_grad():
            head.weight.copy_(batch["weight"][head.class_start : head.class_end])
        x = local_slice(batch["x"], rank, sizes).to(dtype).requires_grad_(True)
        loss = head(x, local_slice(batch["labels"], rank, sizes))
        loss.backward()
        res = {"loss": float(loss.detach()), "x_grad": x.grad.double(), "w_grad": head.weight.grad.to_dense().double(),
               "sampled": head.last_sampled_classes.clone(), "class_start": head.class_start,
               "class_end": head.class_end}
        if kind == "bce":
            res.update(b_init=float(head.unified_bias), b_grad=float(head.unified_bias.grad))
            opt.step()
            res["b_after"] = float(head.unified_bias)
        else:
            res["pairs"] = tuple(int(t) for t in head.last_pairs)
        out[name] = res
    out["uss"] = _uss_cases(rank, world)
    out["epl"] = _epl_cases(rank, world)
    return pack(out)


EPL_CASES: dict[str, tuple[CombinedMargin, float, float]] = {
    "epl_cosface_f64": (CombinedMargin.cosface(0.4, s=16.0), 1.0, 0.7),
    "epl_arcface_sampled_f64": (CombinedMargin.arcface(0.5, s=16.0), 0.5, 0.3),
}
EPL_START = 1  # step 1: margin CE only; steps 2, 3: plus the empirical-prototype rows


def _epl_batch(name: str, step: int, world: int) -> dict[str, torch.Tensor]:
    return global_batch(950 + 10 * list(EPL_CASES).index(name) + step, C, D, sum(LOSS_SIZES[world]), label_range=8)


def _epl_init(name: str, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(960 + list(EPL_CASES).index(name))
    return torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1)


def _epl_cases(rank: int, world: int) -> dict:
    sizes, out = LOSS_SIZES[world], {}
    for name, (margin, rate, k) in EPL_CASES.items():
        head = EPLHead(C, D, margin, sample_rate=rate, storage_dtype=torch.float64, seed=7, k=k, start_iter=EPL_START)
        with torch.no_grad():
            head.weight.copy_(_epl_batch(name, 0, world)["weight"][head.class_start : head.class_end])
            head.epl_memory.copy_(_epl_init(name, world)[head.class_start : head.class_end])
        steps = []
        for step in range(1, USS_STEPS + 1):
            batch = _epl_batch(name, step, world)
            head.weight.grad = None
            x = local_slice(batch["x"], rank, sizes).clone().requires_grad_(True)
            loss = head(x, local_slice(batch["labels"], rank, sizes))
            loss.backward()
            steps.append({"loss": float(loss.detach()), "x_grad": x.grad.clone(),
                          "w_grad": head.weight.grad.to_dense().clone(), "sampled": head.last_sampled_classes.clone(),
                          "class_start": head.class_start, "class_end": head.class_end,
                          "memory": head.epl_memory.clone()})
        out[name] = steps
    return out


USS_CASES: dict[str, tuple[float, dict[str, Any]]] = {
    "uss_f64": (1.0, {"uss_margin": 0.1, "uss_weight": 1.0}),
    "uss_sampled_f64": (0.5, {"uss_margin": 0.2, "uss_weight": 0.5}),
}
USS_STEPS = 3


def _uss_batch(name: str, step: int, world: int) -> dict[str, torch.Tensor]:
    return global_batch(900 + 10 * list(USS_CASES).index(name) + step, C, D, sum(LOSS_SIZES[world]), label_range=8)


def _uss_cases(rank: int, world: int) -> dict:
    """USS steps 1..3 (no weight update): step 1 has an empty memory (CE only), step 2 initialises b."""
    sizes, out = LOSS_SIZES[world], {}
    for name, (rate, kwargs) in USS_CASES.items():
        head = USSHead(C, D, CombinedMargin.cosface(0.4, s=16.0), sample_rate=rate, storage_dtype=torch.float64,
                       seed=5, **kwargs)
        with torch.no_grad():
            head.weight.copy_(_uss_batch(name, 0, world)["weight"][head.class_start : head.class_end])
        steps = []
        for step in range(1, USS_STEPS + 1):
            batch = _uss_batch(name, step, world)
            head.weight.grad = head.unified_bias.grad = None
            x = local_slice(batch["x"], rank, sizes).clone().requires_grad_(True)
            b_before = float(head.unified_bias)
            loss = head(x, local_slice(batch["labels"], rank, sizes))
            loss.backward()
            b_grad = head.unified_bias.grad
            steps.append({"loss": float(loss.detach()), "x_grad": x.grad.clone(), "b_before": b_before,
                          "b_used": float(head.unified_bias), "ready": bool(head.unified_bias_ready),
                          "b_grad": None if b_grad is None else float(b_grad),
                          "w_grad": head.weight.grad.to_dense().clone(), "sampled": head.last_sampled_classes.clone(),
                          "class_start": head.class_start, "class_end": head.class_end})
        out[name] = steps
    return out


@functools.cache
def _results(world: int) -> list[dict]:
    return [unpack(b) for b in run_distributed(_run_cases, world, timeout=180)]


def _reference(name: str, world: int, columns: torch.Tensor | None) -> tuple[float, list[torch.Tensor]]:
    kind, margin, _, _, kwargs = CASES[name]
    batch = _batch(name, world)
    m = ref_margin(margin)
    if kind == "bce":
        b0 = torch.tensor(uniface_bias_init(C, kwargs.get("bias_ratio", 1.0)), dtype=torch.float64)
        lam = kwargs.get("neg_weight", 1.0)
        return grads_of(lambda x, w, b: ref_bce(x, w, b, batch["labels"], m, lam, columns),
                        batch["x"], batch["weight"], b0)
    return grads_of(lambda x, w: ref_unpg(x, w, batch["labels"], m, kwargs["whisker"], columns),
                    batch["x"], batch["weight"])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_head_matches_reference(world: int, name: str) -> None:
    """Global loss identical on every rank; each rank's embedding gradient is its slice and its
    prototype gradient its shard of the reference gradient (over the union of sampled classes)."""
    kind, _, rate, dtype, _ = CASES[name]
    sizes, results, tol = LOSS_SIZES[world], _results(world), TOL[dtype]
    columns = None
    if rate < 1.0:
        columns = torch.sort(torch.cat([r[name]["sampled"] for r in results])).values
        assert columns.numel() < C, "the sampled case must actually sample"
    ref_loss, grads = _reference(name, world, columns)
    for rank, res in enumerate(results):
        got = res[name]
        assert rel_err(got["loss"], ref_loss) < tol, (rank, got["loss"], ref_loss)
        if sizes[rank]:
            assert rel_err(got["x_grad"], local_slice(grads[0], rank, sizes)) < tol, rank
        shard = grads[1][got["class_start"] : got["class_end"]]
        assert rel_err(got["w_grad"], shard) < (tol * 10 if dtype == torch.float32 else tol), rank
        if kind == "bce":
            assert rel_err(got["b_grad"], grads[2]) < tol, (rank, got["b_grad"], float(grads[2]))
    assert len({r[name]["loss"] for r in results}) == 1, "loss differs between ranks"


@pytest.mark.parametrize("world", WORLDS)
def test_bce_unified_bias_is_identical_on_every_rank_after_a_step(world: int) -> None:
    """b starts at log(C·r·10), gets the full (all-reduced) gradient on every rank, and every rank
    applies the same SGD update, so the replicas never drift apart."""
    for name in ("bce_cosface_f64", "bce_arcface_sampled_f64"):
        ratio = CASES[name][4].get("bias_ratio", 1.0)
        res = [r[name] for r in _results(world)]
        assert all(math.isclose(r["b_init"], math.log(C * ratio * 10)) for r in res)
        assert len({r["b_after"] for r in res}) == 1
        expected = res[0]["b_init"] - SGD["lr"] * (res[0]["b_grad"] + SGD["weight_decay"] * res[0]["b_init"])
        assert math.isclose(res[0]["b_after"], expected, rel_tol=1e-12)


@pytest.mark.parametrize("world", WORLDS)
def test_unpg_filters_pairs_of_the_global_batch_on_rank_zero_only(world: int) -> None:
    """Rank 0 forms every negative pair of the GLOBAL batch and keeps those within the whiskers."""
    name = "unpg_cosface_sampled_f64"
    batch = _batch(name, world)
    x = torch.nn.functional.normalize(batch["x"], dim=1)
    y = batch["labels"]
    cos = torch.stack([x[i] @ x[j] for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] != y[j]])
    kept = int(box_whisker_keep(cos, CASES[name][4]["whisker"]).sum())
    results = _results(world)
    assert results[0][name]["pairs"] == (kept, cos.numel())
    assert 0 < kept < cos.numel(), "the whisker must filter something in this case"
    assert all(r[name]["pairs"] == (0, 0) for r in results[1:])


def test_linear_quantile_matches_torch_quantile() -> None:
    values = torch.sort(torch.randn(37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).values
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert math.isclose(float(linear_quantile(values, q)), float(torch.quantile(values, q)), rel_tol=1e-12)


def test_unpg_with_a_single_identity_has_no_pairs() -> None:
    x = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    pairs, total = filtered_negative_pairs(x, torch.zeros(4, dtype=torch.int64), 1.5)
    assert pairs.numel() == 0 and total == 0


def test_bce_state_dict_round_trip_keeps_the_unified_bias_out_of_the_class_rows() -> None:
    head = BCEHead(C, D, CombinedMargin.cosface(), storage_dtype=torch.float64)
    opt = head.make_optimizer(**SGD)
    batch = global_batch(1, C, D, 6)
    head(batch["x"], batch["labels"]).backward()
    opt.step()
    state = head.state_dict()
    assert "unified_bias" not in state["rows"] and "unified_bias" not in state["optimizer"]["rows"]
    other = BCEHead(C, D, CombinedMargin.cosface(), storage_dtype=torch.float64)
    other.make_optimizer(**SGD)
    other.load_state_dict(state)
    assert torch.equal(other.unified_bias, head.unified_bias)
    assert torch.equal(other.optimizer.state[other.unified_bias]["momentum_buffer"],
                       opt.state[head.unified_bias]["momentum_buffer"])
    del state["replicated"]
    with pytest.raises(ValueError, match="'replicated'"):
        other.load_state_dict(state)


@pytest.mark.parametrize(("make", "rows"), [
    (lambda: EPLHead(C, D, CombinedMargin.arcface(), k=0.5, start_iter=0, storage_dtype=torch.float64),
     ("epl_memory", "epl_memory_iter")),
    (lambda: USSHead(C, D, CombinedMargin.arcface(), uss_margin=0.1, uss_weight=1.0, start_iter=0,
                     storage_dtype=torch.float64), ("uss_memory", "uss_memory_iter")),
])
def test_memory_heads_round_trip_their_class_memory_and_refuse_a_damaged_one(make: Any, rows: tuple[str, ...]) -> None:
    head = make()
    opt = head.make_optimizer(**SGD)
    batch = global_batch(1, C, D, 6)
    head(batch["x"], batch["labels"]).backward()
    opt.step()
    state = head.state_dict()
    other = make()
    other.make_optimizer(**SGD)
    other.load_state_dict(state)
    for name in rows:
        assert torch.equal(getattr(other, name), getattr(head, name))
    wrong = {**state, "rows": {**state["rows"], rows[0]: state["rows"][rows[0]][:-1]}}
    with pytest.raises(ValueError, match=rf"rows\['{rows[0]}'\] has shape"):
        other.load_state_dict(wrong)
    missing = {**state, "rows": {k: v for k, v in state["rows"].items() if k != rows[1]}}
    with pytest.raises(ValueError, match="field 'rows' lacks"):
        other.load_state_dict(missing)


def test_heads_reject_vpl_and_linear_margin() -> None:
    from fr_train.heads import VPLConfig

    with pytest.raises(ValueError, match="VPL"):
        BCEHead(C, D, CombinedMargin.cosface(), vpl=VPLConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalised margin"):
        UNPGHead(C, D, CombinedMargin.softmax())


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(USS_CASES))
def test_uss_matches_reference_over_steps(world: int, name: str) -> None:
    """Step 1 (empty memory) is plain CosFace; from step 2 the USS term compares with the features
    written at earlier steps, b is lazily set to the batch mean logsumexp of the negatives, and loss,
    d/d embeddings, d/d prototypes and d/d b equal the reference on every rank."""
    rate, kwargs = USS_CASES[name]
    sizes, results = LOSS_SIZES[world], _results(world)
    m = ref_margin(CombinedMargin.cosface(0.4, s=16.0))
    weight = _uss_batch(name, 0, world)["weight"]
    memory: dict[int, torch.Tensor] = {}
    b_value: float | None = None
    for step in range(1, USS_STEPS + 1):
        batch = _uss_batch(name, step, world)
        got = [r["uss"][name][step - 1] for r in results]
        columns = sorted(int(c) for c in torch.cat([g["sampled"] for g in got]))
        if rate < 1.0:
            assert len(columns) < C
        if b_value is None and any(c in memory for c in columns):
            b_value = ref_uss_bias_init(batch["x"], batch["labels"], m.s, memory, columns)
        if step == 1:
            assert b_value is None and not any(g["ready"] for g in got)
        b = torch.tensor(0.0 if b_value is None else b_value, dtype=torch.float64)
        used = dict(memory) if b_value is not None else {}
        ref_loss, (gx, gw, gb) = grads_of(
            lambda x, w, bb, batch=batch, columns=columns, used=used: ref_uss(
                x, w, bb, batch["labels"], m, used, kwargs["uss_margin"], kwargs["uss_weight"], columns),
            batch["x"], weight, b)
        for rank, g in enumerate(got):
            assert rel_err(g["loss"], ref_loss) < 1e-6, (step, rank, g["loss"], ref_loss)
            if sizes[rank]:
                assert rel_err(g["x_grad"], local_slice(gx, rank, sizes)) < 1e-6, (step, rank)
            assert rel_err(g["w_grad"], gw[g["class_start"] : g["class_end"]]) < 1e-6, (step, rank)
            if b_value is not None:
                assert g["ready"] and abs(g["b_used"] - b_value) < 1e-9 * abs(b_value), (step, rank)
                assert rel_err(g["b_grad"], gb) < 1e-6, (step, rank, g["b_grad"], float(gb))
        assert len({g["loss"] for g in got}) == 1, "loss differs between ranks"
        ref_uss_memory(batch["x"], batch["labels"], memory)
    assert b_value is not None


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(EPL_CASES))
def test_epl_matches_reference_over_steps(world: int, name: str) -> None:
    """Every step updates the empirical prototypes of the batch's classes before the loss (sharded
    memory equals the reference memory); after start_iter the loss adds the empirical rows with the
    adaptive margin, and loss and gradients equal the reference on every rank."""
    margin, rate, k = EPL_CASES[name]
    sizes, results, m = LOSS_SIZES[world], _results(world), ref_margin(margin)
    weight = _epl_batch(name, 0, world)["weight"]
    memory = _epl_init(name, world)
    for step in range(1, USS_STEPS + 1):
        batch = _epl_batch(name, step, world)
        got = [r["epl"][name][step - 1] for r in results]
        columns = sorted(int(c) for c in torch.cat([g["sampled"] for g in got]))
        if rate < 1.0:
            assert len(columns) < C
        ref_epl_update(memory, batch["x"], batch["labels"])
        assert rel_err(torch.cat([g["memory"] for g in got]), memory) < 1e-12, step
        snapshot, active = memory.clone(), step > EPL_START
        ref_loss, (gx, gw) = grads_of(
            lambda x, w, batch=batch, columns=columns, mem=snapshot, active=active: ref_epl(
                x, w, batch["labels"], m, mem, k, active, columns),
            batch["x"], weight)
        for rank, g in enumerate(got):
            assert rel_err(g["loss"], ref_loss) < 1e-6, (step, rank, g["loss"], ref_loss)
            if sizes[rank]:
                assert rel_err(g["x_grad"], local_slice(gx, rank, sizes)) < 1e-6, (step, rank)
            assert rel_err(g["w_grad"], gw[g["class_start"] : g["class_end"]]) < 1e-6, (step, rank)
        assert len({g["loss"] for g in got}) == 1, "loss differs between ranks"
