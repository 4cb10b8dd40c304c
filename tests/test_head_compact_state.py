"""The compact head state (fr_train/heads/compact.py): fp8 SGD momentum and fp8 VPL bank, one float32
scale per row, int32 VPL timestamps — against the float64 single-process reference at world sizes 1,
2 and 4 (gloo, CPU), its checkpoint round trip and re-split, and its bytes per class.

Two references (three tolerances):
- EXACT (given the state): each step's loss and gradients equal the float64 reference evaluated at
  the head's own weights and its own dequantised bank (relative 1e-10: float64 arithmetic, the
  dequantisation is exact in float64), and the stored momentum is the reference's
  ``μ·m̂ + g + wd·w`` quantised — within e4m3's rounding, ``|m̂′ − v| ≤ 2⁻⁴·|v| + 2⁻¹⁰·scale``
  elementwise. This proves the code computes what it claims; any bug would show at 1e-10.
- DRIFT (vs full precision): the float64 head with compact state follows the float64 reference run
  with full-precision momentum and bank (STEPS = 5 SGD steps at lr 0.2, μ 0.9, wd 5e-4; VPL λ 0.15
  injecting from step 2) within DRIFT_TOL. Measured 2026-12-01 (max over world sizes 1, 2, 4 and the
  steps; relative to the largest entry): no VPL — loss 2.6e-4, dL/dx 1.3e-2, dL/dW 1.2e-2, final
  weights 6.1e-3; VPL — loss 5.8e-4, dL/dx 3.6e-2, dL/dW 1.8e-2, weights 6.0e-3. Where it comes from
  (world 1, per step): steps 1–2 without VPL are exact (the first momentum write is not yet read);
  step 2 with VPL isolates the bank: 2.5 % RMS row error × λ = 0.15 moves a prototype by ~0.4 %, which
  s = 64 turns into 5.9e-3 on dL/dx; the momentum error then feeds the weights (lr·6 % of m per
  step) and the gradients' error grows along the trajectory to 1.3e-2 (no VPL) / 2.7e-2 (VPL) by
  step 5. Tolerances ~3× the measured maxima: loss 2e-3, gradients 1e-1, weights 2e-2. A bug (a
  scale lost, a row swapped, a stale write) is O(1) here, and is caught at 1e-10 by EXACT anyway.
- The production layout (bf16 weight + fp8 state, float32 compute) against the same float64
  reference: the bf16 head with bf16 momentum and bank (today's layout) already errs dL/dx 2.0e-2,
  dL/dW 1.3e-2, weights 7.4e-3 on these inputs; with fp8 state 4.0e-2, 2.3e-2, 7.4e-3 (loss 4.8e-4
  vs 2.8e-4). BF16_TOL = 1e-1 bounds it, and it must stay within 2× the bf16 head's error + DRIFT_TOL.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from fr_train.config import ConfigError, build_config
from fr_train.heads import CombinedMargin, PartialFC, VPLConfig, class_shard, reshard_head_states
from fr_train.heads.compact import FP8, FP8_MAX, dequantize_rows, quantize_rows, same_bits
from fr_train.heads.optim import RowSparseAdamW
from tests.distributed import run_distributed
from tests.head_reference import (
    ReferenceVPL,
    global_batch,
    local_slice,
    pack,
    ref_margin,
    reference_grads,
    rel_err,
    train_head,
    unpack,
)

WORLDS = [1, 2, 4]
CLASSES, DIM, STEPS = 24, 32, 5
SIZES: dict[int, list[int]] = {1: [16], 2: [9, 7], 3: [6, 4, 6], 4: [5, 6, 0, 5]}  # one global batch of 16
RATE = 0.6
OPT = {"lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}
VPL_CFG = VPLConfig(lambda_=0.15, delta_t=2, start_iter=1)  # the paper's λ; injection from step 2
CASES: dict[str, tuple[torch.dtype, bool, bool]] = {  # name: (storage dtype, VPL, compact state)
    "f64": (torch.float64, False, True),
    "f64_vpl": (torch.float64, True, True),
    "bf16_vpl": (torch.bfloat16, True, True),
    "bf16_vpl_full": (torch.bfloat16, True, False),
}
EXACT_TOL = 1e-10
DRIFT_TOL = {"loss": 2e-3, "grad": 1e-1, "weight": 2e-2}
BF16_TOL = 1e-1
RESUME_STEP = 3  # the world-size-1 state after step RESUME_STEP − 1 is re-split and step RESUME_STEP taken


def _batch(step: int) -> dict[str, torch.Tensor]:
    return global_batch(700 + step, CLASSES, DIM, 16, label_range=CLASSES // 2)  # duplicates, unseen classes


def _head(storage: torch.dtype, vpl: bool, compact: bool, rate: float = RATE) -> PartialFC:
    return PartialFC(CLASSES, DIM, CombinedMargin.arcface(), sample_rate=rate, vpl=VPL_CFG if vpl else None,
                     storage_dtype=storage, seed=3, momentum_dtype=FP8 if compact else None,
                     memory_dtype=FP8 if compact and vpl else None)


def _momentum(opt: Any, head: PartialFC) -> torch.Tensor:
    """The momentum rows in float64 (dequantised when compact)."""
    state = opt.state[head.weight]
    if "momentum_scale" in state:
        return dequantize_rows(state["momentum_buffer"], state["momentum_scale"], torch.float64)
    return state["momentum_buffer"].double()


def _bank(head: PartialFC) -> torch.Tensor:
    return head._memory_rows(None, torch.float64).double()


def _train(rank: int, world: int, name: str) -> dict[str, Any]:
    """STEPS training steps of case ``name`` from the reference's initial weights; per step the state
    before (weights, momentum, bank, timestamps), the loss and gradients, and the sampled classes."""
    storage, vpl, compact = CASES[name]
    sizes = SIZES[world]
    head = _head(storage, vpl, compact)
    opt = head.make_optimizer(**OPT)
    with torch.no_grad():
        head.weight.copy_(_batch(0)["weight"][head.class_start : head.class_end])
    x_dtype = torch.float64 if storage == torch.float64 else torch.float32
    steps = []
    for step in range(1, STEPS + 1):
        batch = _batch(step)
        before = {"weight": head.weight.detach().double().clone(), "momentum": _momentum(opt, head)}
        if vpl:
            before |= {"bank": _bank(head), "memory_iter": head.vpl_memory_iter.clone()}
        x = local_slice(batch["x"], rank, sizes).to(x_dtype).requires_grad_(True)
        loss = head(x, local_slice(batch["labels"], rank, sizes))
        loss.backward()
        steps.append({"loss": float(loss.detach()), "x_grad": x.grad.double(), "before": before,
                      "w_grad": head.weight.grad.to_dense().double(), "sampled": head.last_sampled_classes.clone()})
        opt.step()
        opt.zero_grad()
    final = {"weight": head.weight.detach().double().clone(), "momentum": _momentum(opt, head)}
    if vpl:
        final |= {"bank": _bank(head), "memory_iter": head.vpl_memory_iter.clone()}
    return {"steps": steps, "final": final}


def _resume(rank: int, world: int, states: list[bytes]) -> dict[str, Any]:
    """Load a re-split compact state and take step RESUME_STEP (rate 1: a re-split state carries no
    sampler stream, so sampled classes would differ from the world-size-1 run's)."""
    head = _head(torch.float64, True, True, rate=1.0)
    opt = head.make_optimizer(**OPT)
    head.load_state_dict(unpack(states[rank]))
    batch = _batch(RESUME_STEP)
    loss = head(local_slice(batch["x"], rank, SIZES[world]), local_slice(batch["labels"], rank, SIZES[world]))
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach()), "state": head.state_dict()}


def _rank_all(rank: int, world: int, resume_states: list[bytes]) -> bytes:
    return pack({"train": {name: _train(rank, world, name) for name in CASES},
                 "resume": _resume(rank, world, resume_states)})


@functools.cache
def world1_run(rate: float) -> tuple[list[float], list[dict[str, Any]]]:
    """The compact float64 VPL head at world size 1, in this process: losses of steps 1..STEPS and the
    head states after steps 0..STEPS (the source of the re-split and round-trip tests)."""
    head = _head(torch.float64, True, True, rate)
    opt = head.make_optimizer(**OPT)
    with torch.no_grad():
        head.weight.copy_(_batch(0)["weight"])
    return train_head(head, opt, _batch, STEPS)


@functools.cache
def results(world: int) -> list[dict[str, Any]]:
    """Every rank's results at ``world`` (one spawn per world size, cached for the session)."""
    _, states = world1_run(1.0)
    resplit = [pack(s) for s in reshard_head_states([states[RESUME_STEP - 1]], world)]
    return [unpack(r) for r in run_distributed(_rank_all, world, resplit, timeout=300)]


def _cat(ranks: list[dict], *path: str) -> torch.Tensor:
    def get(d: Any) -> Any:
        for p in path:
            d = d[p]
        return d
    return torch.cat([get(r) for r in ranks])


def _per_step(world: int, name: str) -> list[dict[str, Any]]:
    """The ranks' results of case ``name`` joined per step (shards concatenated in class order)."""
    ranks = [r["train"][name] for r in results(world)]
    out = []
    for step in range(STEPS):
        per = [r["steps"][step] for r in ranks]
        assert all(p["loss"] == per[0]["loss"] for p in per), "the loss must be identical on every rank"
        joined = {"loss": per[0]["loss"], "x_grad": _cat(per, "x_grad"), "w_grad": _cat(per, "w_grad"),
                  "sampled": _cat(per, "sampled"), "before": {k: _cat(per, "before", k) for k in per[0]["before"]}}
        out.append(joined)
    return out


def _final(world: int, name: str) -> dict[str, torch.Tensor]:
    ranks = [r["train"][name] for r in results(world)]
    return {k: _cat(ranks, "final", k) for k in ranks[0]["final"]}


def _fp8_bound(v: torch.Tensor) -> torch.Tensor:
    """Largest |v̂ − v| of absmax-scaled e4m3fn per element: half an ulp of a normal (≤ 2⁻⁴·|v|) or of
    a subnormal (2⁻¹⁰ in units of the scale)."""
    scale = v.abs().amax(dim=1, keepdim=True) / FP8_MAX
    return 2.0**-4 * v.abs() + 2.0**-10 * scale + 1e-12


def _reference_step(vpl_ref: ReferenceVPL | None, batch: dict[str, torch.Tensor], weight: torch.Tensor,
                    columns: torch.Tensor, step: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    margin = ref_margin(CombinedMargin.arcface())
    if vpl_ref is None:
        loss, gx, gw, _ = reference_grads(batch["x"], weight, batch["labels"], margin, columns=columns)
        return loss, gx, gw
    return vpl_ref.step_grads(batch["x"], weight, batch["labels"], margin, step, columns=columns)


def _full_precision_run(vpl: bool, columns_of: list[torch.Tensor]) -> tuple[list[tuple[float, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The float64 reference trajectory with full-precision momentum and bank, sampling the head's
    columns: per step (loss, dL/dx, dL/dW), and the final weights."""
    w = _batch(0)["weight"].clone()
    buf = torch.zeros_like(w)
    init = _head(torch.float64, True, False).vpl_memory if vpl else None
    vpl_ref = ReferenceVPL(init, VPL_CFG.lambda_, VPL_CFG.delta_t, VPL_CFG.start_iter) if vpl else None
    out = []
    for step in range(1, STEPS + 1):
        cols = columns_of[step - 1]
        loss, gx, gw = _reference_step(vpl_ref, _batch(step), w, cols, step)
        out.append((loss, gx, gw))
        buf[cols] = OPT["momentum"] * buf[cols] + gw[cols] + OPT["weight_decay"] * w[cols]  # SGD, dampening 0
        w[cols] = w[cols] - OPT["lr"] * buf[cols]
    return out, w


# --------------------------------------------------------------------------------------------------
# The quantiser
# --------------------------------------------------------------------------------------------------
def test_fp8_rows_round_within_e4m3_precision_and_keep_the_row_maximum() -> None:
    """absmax/448 per row: the largest entry is exact, every entry within e4m3's half-ulp, a zero row
    stays zero (scale 0), and rows of very different magnitude keep the same relative precision."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, 512, generator=g, dtype=torch.float64) * torch.logspace(-6, 3, 64, dtype=torch.float64)[:, None]
    v[5] = 0.0
    q, s = quantize_rows(v)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (64,)
    back = dequantize_rows(q, s, torch.float64)
    assert bool(((back - v).abs() <= _fp8_bound(v)).all())
    assert torch.equal(back[5], torch.zeros(512, dtype=torch.float64)) and float(s[5]) == 0.0
    top = v.abs().argmax(dim=1)
    assert rel_err(back.gather(1, top[:, None]), v.gather(1, top[:, None])) < 1e-6  # 448·scale = absmax (fp32 scale)
    rms = ((back - v).norm(dim=1) / v.norm(dim=1).clamp_min(1e-300))[torch.arange(64) != 5]
    assert float(rms.max()) < 0.04, "~2.5 % RMS per row whatever its magnitude"


# --------------------------------------------------------------------------------------------------
# Loss, gradients, trajectory vs the float64 reference at world sizes 1, 2, 4
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["f64", "f64_vpl"])
def test_compact_head_computes_exactly_from_its_state(world: int, name: str) -> None:
    """Each step: loss, dL/dx and dL/dW equal the float64 reference at the head's own weights and
    dequantised bank (1e-10); the weight update uses μ·m̂ + g + wd·w (1e-10) and the stored momentum
    is that value rounded to fp8 (e4m3 bound); unsampled rows keep their momentum bytes."""
    _, vpl, _ = CASES[name]
    steps, final = _per_step(world, name), _final(world, name)
    for k, s in enumerate(steps):
        step, cols, w = k + 1, s["sampled"], s["before"]["weight"]
        vpl_ref = None
        if vpl:
            vpl_ref = ReferenceVPL(s["before"]["bank"], VPL_CFG.lambda_, VPL_CFG.delta_t, VPL_CFG.start_iter)
            vpl_ref.memory_iter = s["before"]["memory_iter"].long().clone()
        loss, gx, gw = _reference_step(vpl_ref, _batch(step), w, cols, step)
        assert rel_err(s["loss"], loss) < EXACT_TOL, f"step {step}"
        assert rel_err(s["x_grad"], gx) < EXACT_TOL, f"step {step}"
        assert rel_err(s["w_grad"], gw) < EXACT_TOL, f"step {step}"
        after = steps[k + 1]["before"] if k + 1 < STEPS else final
        v = OPT["momentum"] * s["before"]["momentum"][cols] + gw[cols] + OPT["weight_decay"] * w[cols]
        assert rel_err(after["weight"][cols], w[cols] - OPT["lr"] * v) < EXACT_TOL, f"step {step}"
        assert bool(((after["momentum"][cols] - v).abs() <= _fp8_bound(v)).all()), f"step {step}"
        unsampled = torch.ones(CLASSES, dtype=torch.bool)
        unsampled[cols] = False
        assert torch.equal(after["momentum"][unsampled], s["before"]["momentum"][unsampled])
        assert torch.equal(after["weight"][unsampled], w[unsampled])
    if vpl:
        assert final["memory_iter"].dtype == torch.int32
        assert (final["memory_iter"] == -1).any() and (final["memory_iter"] == STEPS).any()


@functools.cache
def _drift(world: int, name: str) -> dict[str, float]:
    """Largest relative error of case ``name`` against the full-precision float64 run, over the steps."""
    _, vpl, _ = CASES[name]
    steps = _per_step(world, name)
    reference, w_ref = _full_precision_run(vpl, [s["sampled"] for s in steps])
    err = {"loss": 0.0, "x_grad": 0.0, "w_grad": 0.0}
    for s, (loss, gx, gw) in zip(steps, reference, strict=True):
        err["loss"] = max(err["loss"], rel_err(s["loss"], loss))
        err["x_grad"] = max(err["x_grad"], rel_err(s["x_grad"], gx))
        err["w_grad"] = max(err["w_grad"], rel_err(s["w_grad"], gw))
    err["weight"] = rel_err(_final(world, name)["weight"], w_ref)
    return err


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["f64", "f64_vpl"])
def test_compact_training_trajectory_stays_near_full_precision(world: int, name: str) -> None:
    """STEPS SGD steps (VPL injecting from step 2): the compact head's losses, gradients and final
    weights against the float64 run with full-precision momentum and bank (DRIFT_TOL, module doc)."""
    err = _drift(world, name)
    assert err["loss"] < DRIFT_TOL["loss"], err
    assert max(err["x_grad"], err["w_grad"]) < DRIFT_TOL["grad"], err
    assert err["weight"] < DRIFT_TOL["weight"], err
    assert err["loss"] > 0, "the compact state must have been read (else this test is vacuous)"


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_weight_with_fp8_state_errs_like_the_bf16_head(world: int) -> None:
    """The production layout (bf16 weight, fp8 momentum + bank, fp32 compute) vs the float64 reference:
    within BF16_TOL, and not much worse than the all-bf16 head (module doc)."""
    compact, full = _drift(world, "bf16_vpl"), _drift(world, "bf16_vpl_full")
    for key in ("loss", "x_grad", "w_grad", "weight"):
        assert compact[key] < BF16_TOL, (key, compact, full)
        assert compact[key] < 2 * full[key] + DRIFT_TOL["loss" if key == "loss" else "grad"], (key, compact, full)


# --------------------------------------------------------------------------------------------------
# Checkpoint: round trip and re-split
# --------------------------------------------------------------------------------------------------
def _all_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"rows.{k}": v for k, v in state["rows"].items()}
    for p, entries in state["optimizer"]["rows"].items():
        out |= {f"optimizer.{p}.{k}": v for k, v in entries.items()}
    return out


def test_state_dict_round_trip_is_bitwise_and_training_continues_identically() -> None:
    """save → torch.save/load(weights_only) → load into a fresh head: every tensor (fp8 rows, float32
    scales, int32 timestamps) bitwise equal; the next step from both heads is bitwise equal too."""
    _, states = world1_run(RATE)
    state = states[2]
    tensors = _all_tensors(state)
    assert tensors["rows.vpl_memory"].dtype == FP8 and tensors["optimizer.weight.momentum_buffer"].dtype == FP8
    assert tensors["rows.vpl_memory_scale"].dtype == torch.float32 and tensors["rows.vpl_memory_iter"].dtype == torch.int32
    assert set(tensors) == {"rows.weight", "rows.vpl_memory", "rows.vpl_memory_scale", "rows.vpl_memory_iter",
                            "optimizer.weight.momentum_buffer", "optimizer.weight.momentum_scale"}
    heads = []
    for source in (state, unpack(pack(state))):
        head = _head(torch.float64, True, True)
        opt = head.make_optimizer(**OPT)
        head.load_state_dict(source)
        again = _all_tensors(head.state_dict())
        assert all(same_bits(again[k], tensors[k]) for k in tensors), [k for k in tensors if not same_bits(again[k], tensors[k])]
        batch = _batch(3)
        head(batch["x"], batch["labels"]).backward()
        opt.step()
        heads.append(_all_tensors(head.state_dict()))
    assert all(same_bits(heads[0][k], heads[1][k]) for k in tensors)
    assert all(same_bits(heads[0][k], _all_tensors(states[3])[k]) for k in tensors), "the uninterrupted step 3"


def _union(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    per = [_all_tensors(s) for s in states]
    return {k: torch.cat([p[k] for p in per]) for k in per[0]}


@pytest.mark.parametrize(("src", "dst"), [(1, 4), (4, 2), (2, 3), (3, 1)])
def test_resplit_moves_fp8_rows_and_scales_unchanged(src: int, dst: int) -> None:
    """Re-splitting for another world size moves each class's fp8 rows, scales and timestamps
    bitwise (no requantisation), in the contiguous split rule's ranges."""
    _, states = world1_run(1.0)
    full = _all_tensors(states[STEPS])
    out = reshard_head_states(reshard_head_states([states[STEPS]], src), dst)
    union = _union(out)
    assert all(same_bits(union[k], full[k]) for k in full), [k for k in full if not same_bits(union[k], full[k])]
    for r, s in enumerate(out):
        shard = class_shard(CLASSES, dst, r)
        assert (s["class_start"], s["num_local"]) == (shard.class_start, shard.num_local)
        assert all(t.shape[0] == shard.num_local for t in _all_tensors(s).values())


@pytest.mark.parametrize("world", WORLDS)
def test_training_resumes_from_a_resplit_compact_state(world: int) -> None:
    """The world-size-1 state after step RESUME_STEP−1, re-split for ``world`` and loaded, takes step
    RESUME_STEP with the world-size-1 loss (1e-12) and the same post-step state: float64 weights to
    1e-12, fp8 rows and scales bitwise (the quantised values come from the same float64 numbers)."""
    losses, states = world1_run(1.0)
    ranks = [r["resume"] for r in results(world)]
    assert all(abs(r["loss"] - losses[RESUME_STEP - 1]) <= 1e-12 * abs(losses[RESUME_STEP - 1]) for r in ranks)
    got, want = _union([r["state"] for r in ranks]), _all_tensors(states[RESUME_STEP])
    for k in want:
        if want[k].dtype == torch.float64:
            assert rel_err(got[k], want[k]) < 1e-12, k
        else:
            assert same_bits(got[k], want[k]), k


def test_mixing_compact_and_full_precision_states_is_refused_naming_the_key() -> None:
    """A compact checkpoint never loads into a full-precision head (or back) by reinterpreting bytes."""
    _, states = world1_run(RATE)
    full = _head(torch.float64, True, False)
    full.make_optimizer(**OPT)
    with pytest.raises(ValueError, match="field 'rows' holds"):
        full.load_state_dict(states[1])
    with pytest.raises(ValueError, match=r"head\.vpl_memory_dtype"):
        full.load_state_dict(states[1], strict=False)
    momentum_only = _head(torch.float64, True, False)
    momentum_only.make_optimizer(**OPT)
    full_state = momentum_only.state_dict()
    compact = _head(torch.float64, True, True)
    compact.make_optimizer(**OPT)
    with pytest.raises(ValueError, match="field 'rows' holds"):
        compact.load_state_dict(full_state)
    bank_compact_only = PartialFC(CLASSES, DIM, CombinedMargin.arcface(), vpl=VPL_CFG, storage_dtype=torch.float64,
                                  seed=3, memory_dtype=FP8)
    bank_compact_only.make_optimizer(**OPT)
    with pytest.raises(ValueError, match=r"head\.momentum_dtype"):
        bank_compact_only.load_state_dict(states[1])


# --------------------------------------------------------------------------------------------------
# Configuration, refusals, memory
# --------------------------------------------------------------------------------------------------
def test_config_keys_default_to_todays_layout_and_refuse_what_they_were_not_built_for() -> None:
    cfg = build_config("r18", "vpl")
    assert (cfg.head.momentum_dtype, cfg.head.vpl_memory_dtype) == ("storage", "storage")
    cfg = build_config("r18", "vpl", overrides=["head.storage_dtype=bfloat16", "head.momentum_dtype=float8_e4m3fn",
                                                 "head.vpl_memory_dtype=float8_e4m3fn"])
    assert (cfg.head.momentum_dtype, cfg.head.vpl_memory_dtype) == ("float8_e4m3fn", "float8_e4m3fn")
    refused = {
        ("arcface", "head.vpl_memory_dtype=float8_e4m3fn"): r"head\.vpl_memory_dtype: .*head\.vpl is false; set head\.vpl=true",
        ("arcface", "head.momentum_dtype=float8_e4m3fn", "optimizer.name=adamw"):
            r"head\.momentum_dtype: float8_e4m3fn needs optimizer\.name=sgd",
        ("arcface", "head.momentum_dtype=float8_e4m3fn", "optimizer.momentum=0"):
            r"head\.momentum_dtype: .*optimizer\.momentum is 0; set head\.momentum_dtype=storage",
        ("bce", "head.momentum_dtype=float8_e4m3fn"): r"head\.momentum_dtype: .*not bce; set head\.momentum_dtype=storage",
        ("arcface", "head.momentum_dtype=fp8"): r"head\.momentum_dtype: 'fp8' is not one of 'storage', 'float8_e4m3fn'",
    }
    for (method, *overrides), message in refused.items():
        with pytest.raises(ConfigError, match=message):
            build_config("r18", method, overrides=overrides)


def test_head_refuses_fp8_where_it_does_not_apply() -> None:
    with pytest.raises(ValueError, match=r"memory_dtype .* has no VPL"):
        PartialFC(CLASSES, DIM, CombinedMargin.arcface(), memory_dtype=FP8)
    with pytest.raises(ValueError, match=r"momentum_dtype must be None .* or torch\.float8_e4m3fn"):
        PartialFC(CLASSES, DIM, CombinedMargin.arcface(), momentum_dtype=torch.float16)
    head = PartialFC(CLASSES, DIM, CombinedMargin.arcface(), momentum_dtype=FP8)
    with pytest.raises(ValueError, match="RowSparseAdamW keeps no fp8 state"):
        head.make_optimizer(0.1, kind="adamw")
    with pytest.raises(ValueError, match="needs momentum > 0"):
        head.make_optimizer(0.1, momentum=0.0)
    with pytest.raises(ValueError, match="no fp8 state"):
        RowSparseAdamW([("w", torch.nn.Parameter(torch.zeros(2, 2)))], 0.1, state_dtype=FP8)


def test_memory_report_compact_vpl_head_is_at_most_2100_bytes_per_class() -> None:
    """benchmarks/head.py --memory, read off a real head's tensors at 512-d: bf16 weight 1,024 + fp8
    momentum 512 + fp8 bank 512 + two float32 scales 8 + int32 timestamp 4 = 2,060 B ≤ 2,100 B (the
    bf16 layout of today: 3,080 B); 30M classes = 61.8 GB of state."""
    from benchmarks.head import memory_report

    report = memory_report(classes=256, dim=512, transient_classes=0, budget_gb=80, reserve_gb=12)
    rows = {(r["impl"], r["storage"], r["vpl"]): r for r in report["rows"]}
    compact = rows[("fr_train_compact", "bfloat16", True)]
    assert compact["parts_bytes_per_class"] == {"weight": 1024, "vpl_memory": 512, "vpl_memory_scale": 4,
                                                "vpl_memory_iter": 4, "weight.momentum_buffer": 512,
                                                "weight.momentum_scale": 4}
    assert compact["bytes_per_class"] == 2060 <= 2100
    assert compact["max_classes_persistent"] == int(68e9 // 2060) >= 30_000_000
    assert rows[("fr_train", "bfloat16", True)]["bytes_per_class"] == 3080
    assert rows[("fr_train_compact", "bfloat16", False)]["bytes_per_class"] == 1024 + 512 + 4
