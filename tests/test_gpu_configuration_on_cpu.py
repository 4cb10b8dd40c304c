"""The GPU's configuration runs on CPU: bf16 engine, channels_last activations, float32 batches in.

Why this file exists: `fr_train` had never run on a GPU. Every run crashed in `deepspeed.initialize`
(channels_last parameters, which DeepSpeed broadcasts as bytes) and, past that, at the first forward
(float32 images into a bf16 engine; then stock BatchNorm with bf16 weights and float32 statistics).
Those decisions sat behind `device.type == "cuda"` branches that no CPU test executed. Now they are
configuration resolved in one place (fr_train/train/engine.py) and these tests run them on CPU at
small size: the resolution rules, the engine at world size 2, and the real Trainer at world sizes 1
and 2 through DALI (cpu) and through an in-memory source, with a bitwise resume.

CPU bf16 is 7-11x slower than fp32 on a machine without AVX-512 (depthwise convolutions fall back to
a slow kernel), so the runs are tiny: 32x32 crops, 8 images per rank, a handful of steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fr_train.train.engine import DeviceFacts, EngineFormat, resolve_format
from tests.distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIG = ["run.precision=bf16", "run.channels_last=true"]
# 24 identities x 8 images at 32x32: a few seconds to build, enough for visible learning in 8 steps.
TINY = ["data.synthetic.num_identities=24", "data.synthetic.images_per_identity=8",
        "data.synthetic.holdout_identities=8", "data.synthetic.num_pairs=40", "data.synthetic.image_size=32"]

H100 = DeviceFacts("cuda", bf16_supported=True)
V100 = DeviceFacts("cuda", bf16_supported=False)
CPU = DeviceFacts("cpu", bf16_supported=True)


# ------------------------------------------------------------------------------------------------
# One decision, the same on every device
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "channels_last", "facts", "expected"), [
    ("auto", "auto", H100, EngineFormat("bf16", True)),
    ("auto", "auto", V100, EngineFormat("fp16", True)),
    ("auto", "auto", CPU, EngineFormat("fp32", False)),
    ("bf16", "true", CPU, EngineFormat("bf16", True)),  # the GPU's configuration, allowed on CPU for tests
    ("fp32", "false", H100, EngineFormat("fp32", False)),
    ("fp16", "auto", H100, EngineFormat("fp16", True)),
])
def test_precision_and_memory_format_resolve_from_config_and_device_facts(
        precision: str, channels_last: str, facts: DeviceFacts, expected: EngineFormat) -> None:
    assert resolve_format(precision, channels_last, facts) == expected


def test_formats_say_what_the_batches_become() -> None:
    bf16 = EngineFormat("bf16", True)
    assert bf16.dtype == torch.bfloat16 and bf16.memory_format == torch.channels_last
    assert bf16.loader_dtype(decodes_on_gpu=True) == "float32"  # DALI has no bfloat16: cast on the device
    assert EngineFormat("fp16", True).loader_dtype(decodes_on_gpu=True) == "float16"
    batch = bf16.batch(torch.randn(2, 3, 8, 8), torch.device("cpu"))
    assert batch.dtype == torch.bfloat16 and batch.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("precision", "facts", "message"), [
    ("fp16", CPU, "run.precision=fp16 needs a CUDA GPU"),
    ("bf16", V100, "no bfloat16 support"),
    ("fp8", CPU, "run.precision: 'fp8' is not one of"),
])
def test_impossible_precisions_are_refused_with_the_fix(precision: str, facts: DeviceFacts, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_format(precision, "auto", facts)


def test_no_device_branch_decides_precision_memory_format_or_dtype_outside_the_engine() -> None:
    """DESIGN.md's engine rule, checked on the source: a `device.type == "cuda"` test that also
    names a dtype or memory format anywhere but fr_train/train/engine.py is the bug this file is for."""
    offenders = []
    for path in [*(REPO / "fr_train").rglob("*.py"), *(REPO / "cluster").rglob("*.py")]:
        if path.name == "engine.py" and path.parent.name == "train":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "cuda" in line and any(w in line for w in ("channels_last", "bfloat16", "float16", "precision",
                                                          "memory_format", ".half(")):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------------------------
# The engine at world size 2 (gloo): what crashed on the H200
# ------------------------------------------------------------------------------------------------
def _engine_step(rank: int, world: int) -> tuple[list[str], np.ndarray, bool]:
    from fr_train.backbones import build_backbone
    from fr_train.train import engine as eng

    fmt = resolve_format("bf16", "true", CPU)
    torch.manual_seed(0)
    # The old worker handed DeepSpeed a channels_last module: DeepSpeed's broadcast of parameters as
    # bytes failed on it ("self.stride(-1) must be 1 to view BFloat16 as Byte").
    model = build_backbone("mbf", embedding_size=64, dropout=0.0, image_size=32).to(memory_format=torch.channels_last)
    opt = eng.backbone_optimizer(model.parameters(), "sgd", 0.1, 0.9, 5e-4)
    cfg = eng.deepspeed_config(fmt, micro_batch=4, grad_accum=1, clip_grad_norm=5.0, zero_stage=0)
    engine = eng.build_engine(model, opt, cfg, torch.device("cpu"))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))  # float32, as DALI gives
    out = engine(fmt.batch(images, torch.device("cpu")))  # a float32 batch into a bf16 engine failed here
    engine.backward(out.float().square().mean())
    engine.step()
    params = [p.detach().float().flatten() for p in engine.module.parameters()]
    contiguous = all(p.is_contiguous() for p in engine.module.parameters())
    return sorted({str(p.dtype) for p in engine.module.parameters()}), torch.cat(params).numpy(), contiguous


@pytest.mark.slow
def test_bf16_engine_on_channels_last_model_builds_steps_and_stays_in_sync_at_two_ranks() -> None:
    (dtypes0, params0, contiguous0), (_, params1, _) = run_distributed(_engine_step, 2, timeout=600)
    # bf16 is autocast over a float32 engine: float32 weights, bf16 compute (engine.py's docstring)
    assert dtypes0 == ["torch.float32"] and contiguous0
    assert np.isfinite(params0).all()
    np.testing.assert_array_equal(params0, params1)  # the averaged gradient stepped both replicas alike


def _optimizer_of_a_bf16_engine(rank: int, world: int) -> dict[str, Any]:
    from fr_train.backbones import build_backbone
    from fr_train.checkpointing.deepspeed_state import BackboneOptimizer, portable_optimizer_state
    from fr_train.train import engine as eng

    fmt = resolve_format("bf16", "true", CPU)
    model = build_backbone("mbf", embedding_size=64, dropout=0.0, image_size=32)
    opt = eng.backbone_optimizer(model.parameters(), "sgd", 0.1, 0.9, 5e-4)
    engine = eng.build_engine(model, opt, eng.deepspeed_config(fmt, micro_batch=4, grad_accum=1, clip_grad_norm=5.0,
                                                                zero_stage=0), torch.device("cpu"))
    whole = next(s.component for s in BackboneOptimizer(engine).states() if s.key == "optimizer")
    whole.load_state_dict(portable_optimizer_state(engine))  # its own kind: loads
    # What DeepSpeed's bf16 mode (FP16_UnfusedOptimizer) saved before bf16 became autocast.
    old = {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": 0, "optimizer_state_dict": {},
           "fp32_groups": [], "clip_grad": 5.0}
    whole.owner.restored, whole.owner.where = False, "RUN/checkpoints/step_000000010"
    try:
        whole.load_state_dict(old)
    except ValueError as exc:
        return {"optimizer": type(engine.optimizer).__name__, "foreach": engine.optimizer.defaults["foreach"],
                "clipping": engine.gradient_clipping(), "error": str(exc)}
    return {"error": None}


@pytest.mark.slow
def test_bf16_is_autocast_over_a_float32_engine_with_one_foreach_optimizer() -> None:
    """bf16 runs DeepSpeed's float32 engine under autocast with a plain foreach SGD (fr_train clips at
    ZeRO 0), not DeepSpeed's bf16 mode whose optimizer works tensor by tensor; a checkpoint of that
    mode's optimizer is refused naming the checkpoint, not misread."""
    out = run_distributed(_optimizer_of_a_bf16_engine, 1, timeout=300)[0]
    assert (out["optimizer"], out["foreach"], out["clipping"]) == ("SGD", True, 0.0)
    assert out["error"].startswith("RUN/checkpoints/step_000000010: the backbone optimizer state has fields")
    assert "DeepSpeed's bf16 mode" in out["error"] and "start a new run name" in out["error"]


# ------------------------------------------------------------------------------------------------
# The real Trainer in the GPU's configuration
# ------------------------------------------------------------------------------------------------
def _tiny_config(tmp: Path, cache: Path, name: str, *extra: str, method: str = "arcface") -> dict:
    from cluster.launch import prepare_data
    from fr_train.config import build_config

    cfg = build_config("mbf", method, overrides=[
        f"data.cache_dir={cache}", *TINY, *GPU_CONFIG, f"run.storage={tmp}", f"run.name={name}",
        "data.batch_size=8", "run.log_every=1", "optimizer.lr=0.2", "optimizer.base_batch=16",
        "schedule.warmup_steps=0", "head.s=16", "head.m2=0.1", "checkpoint.every_minutes=0", "run.export_onnx=false", *extra])
    cfg.data.path = str(prepare_data(cfg))
    return cfg.to_dict()


def _fit(rank: int, world: int, cfg_dict: dict, stop_after: int) -> dict:
    from tests.test_resume import fit_stopping_after

    trainer = fit_stopping_after(rank, world, cfg_dict, stop_after)
    return {"losses": [(h["step"], h["loss"]) for h in trainer.state.history], "precision": trainer.precision,
            "dtype": str(trainer.format.dtype), "channels_last": trainer.format.channels_last}


@pytest.mark.slow
def test_bf16_channels_last_trainer_learns_and_evaluates_through_dali_at_one_rank(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    import json

    cfg = _tiny_config(tmp_path, tmp_path_factory.mktemp("gpu_cfg_cache"), "one", "schedule.max_steps=12",
                       "data.batch_size=16", "eval.every_steps=0", "checkpoint.resume=never")
    run = run_distributed(_fit, 1, cfg, 0, timeout=900)[0]
    assert (run["precision"], run["dtype"], run["channels_last"]) == ("bf16", "torch.bfloat16", True)
    losses = [loss for _, loss in run["losses"]]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    evals = [r for r in map(json.loads, (tmp_path / "one" / "train_log.jsonl").read_text().splitlines())
             if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 12] and all(0.0 <= e["accuracy"] <= 1.0 for e in evals)
    assert (tmp_path / "one" / "final" / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_bf16_channels_last_run_through_dali_resumes_bitwise_at_two_ranks(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A run stopped at step 7 (a stop request on the last rank only, as a preemption notice or a
    SIGTERM gives) and resumed from its checkpoint continues exactly as if it had never stopped: the
    same per-step losses bitwise, across the epoch boundary at step 12, with VPL on, through DALI, with
    ZeRO 1 (every rank's optimizer slice), at world size 2, in the GPU's configuration."""
    cache = tmp_path_factory.mktemp("gpu_cfg_cache")
    cfg = _tiny_config(tmp_path, cache, "straight", "schedule.max_steps=14", "eval.enabled=false",
                       "checkpoint.every_steps=4", "checkpoint.resume=never", "run.zero_stage=1",
                       "head.vpl_start_iter=4", "head.vpl_delta_t=8", method="vpl")  # 192 images: 12 steps/epoch
    straight = run_distributed(_fit, 2, cfg, 0, timeout=900)[0]["losses"]
    cfg["run"]["name"], cfg["checkpoint"]["resume"] = "interrupted", "auto"
    first = run_distributed(_fit, 2, cfg, 7, timeout=900)[0]["losses"]
    second = run_distributed(_fit, 2, cfg, 0, timeout=900)[0]["losses"]
    assert [s for s, _ in straight] == list(range(1, 15)) and np.isfinite([loss for _, loss in straight]).all()
    assert [s for s, _ in first] == list(range(1, 8)) and [s for s, _ in second] == list(range(8, 15))
    assert first + second == straight  # bitwise: weights, ZeRO slices, VPL bank, RNG and data position
    checkpoints = sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").glob("step_*"))
    assert checkpoints[-1] == "step_000000012"  # the resumed run checkpoints on: every 4 steps, the epoch end


@pytest.mark.slow
def test_bf16_two_ranks_follow_the_loss_curve_of_one_through_an_in_memory_source(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Same global batches, BatchNorm on running statistics (as the fp32 equivalence tests): W=2
    follows W=1 within bf16 rounding. Why rtol 5e-3: bf16 keeps 8 significant bits (one ulp is 2^-8 ≈
    0.4% relative); W=2 rounds its half-batch gradients to bf16 before DeepSpeed averages them (W=1
    rounds the whole-batch sum once), and convolutions on 8 vs 16 images may take other kernels. The
    updates then differ in their last bits and the loss drifts by a fraction of an ulp per step:
    measured 1.7e-4 relative at most over 4 steps (2026-11-30, this 2-core CPU). 5e-3 is about one ulp,
    while a real error (a missing ×W on the gradient, a wrong dtype in the head) moves the loss by
    percents (in fp32, tests/test_elastic.py holds W=3, 2 and 1 against W=1 to 1e-4)."""
    from tests.test_train_e2e import _real_images, _train_losses

    cfg = _tiny_config(tmp_path, tmp_path_factory.mktemp("gpu_cfg_cache"), "equiv", "eval.enabled=false",
                       "schedule.max_steps=4", "optimizer.clip_grad_norm=0", "optimizer.lr=0.002",
                       "checkpoint.resume=never", "checkpoint.every_steps=0")
    images, labels = _real_images(Path(cfg["data"]["path"]), 64)
    one = np.array(run_distributed(_train_losses, 1, cfg, images, labels, 4, 16, timeout=900)[0])
    two = run_distributed(_train_losses, 2, cfg, images, labels, 4, 16, timeout=900)
    print(f"\nbf16 W=1 {one.tolist()}\nbf16 W=2 {two[0]}")
    assert two[0] == two[1]  # the loss is the same number on every rank
    assert np.isfinite(one).all()
    np.testing.assert_allclose(two[0], one, rtol=5e-3)
    assert len(set(one.tolist())) == len(one)  # every step changed the model


def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no CUDA GPU is visible" in proc.stderr and "bash scripts/test.sh" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists()  # nothing ran
