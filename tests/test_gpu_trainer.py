"""On a CUDA device: the Trainer in bf16 and fp16 (DeepSpeed's loss scaler) for a few steps with DALI
`mixed` decoding, and the head's low-precision options (bf16 logits, bf16 storage) against the
float64 reference. Skipped without CUDA; `scripts/gpu_check.sh` runs them (`pytest -m gpu`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.head_reference import global_batch, ref_margin, reference_grads, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("storage", "matmul"), [(torch.bfloat16, None), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_low_precision_head_on_cuda_matches_the_float64_reference(storage: torch.dtype,
                                                                  matmul: torch.dtype | None) -> None:
    """Tolerances: bf16 keeps 8 significant bits (a rounding ≤ 2^-9 relative). The reference is fed
    the same bf16-rounded prototypes, so only the products differ: at s = 16 a cosine off by ~2^-9
    moves a logit by ≤ 0.03, and the mean loss by about 1% at most; gradients are compared by
    relative error (norm of the difference over the norm) at 3%."""
    from fr_train.heads import CombinedMargin, PartialFC

    margin = CombinedMargin(s=16.0, m1=1.0, m2=0.5, m3=0.0)
    b = global_batch(0, num_classes=64, dim=32, total=24)
    head = PartialFC(64, 32, margin, sample_rate=1.0, storage_dtype=storage, matmul_dtype=matmul,
                     device=torch.device("cuda"))
    with torch.no_grad():
        head.weight.copy_(b["weight"].to(storage))
    x = b["x"].float().cuda().requires_grad_(True)
    loss = head(x, b["labels"].cuda())
    loss.backward()
    ref_loss, ref_dx, ref_dw, _ = reference_grads(b["x"].float(), head.weight.detach().cpu(), b["labels"],
                                                  ref_margin(margin))
    grad_w = head.weight.grad
    grad_w = (grad_w.to_dense() if grad_w.is_sparse else grad_w).double().cpu()
    assert rel_err(float(loss.detach()), ref_loss) < 1e-2
    assert rel_err(x.grad.double().cpu(), ref_dx) < 3e-2
    assert rel_err(grad_w, ref_dw) < 3e-2


def _train_on_gpu(rank: int, world: int, cfg_dict: dict) -> dict:
    from fr_train.config import TrainConfig
    from fr_train.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg_dict), rank, world, torch.device("cuda", rank))
    trainer.fit()
    first = next(iter(trainer.engine.module.parameters()))
    return {"losses": [h["loss"] for h in trainer.state.history], "precision": trainer.precision,
            "dtype": str(first.dtype), "skipped": int(trainer.engine.skipped_steps),
            "pinned_staging": trainer.ckpt.staging.pin_memory}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_trains_on_cuda_in_half_precision(precision: str, tmp_path: Path,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    from cluster.launch import prepare_data
    from fr_train.config import build_config
    from tests.test_gpu_configuration_on_cpu import TINY

    cfg = build_config("r18", "arcface", overrides=[
        f"data.cache_dir={tmp_path_factory.mktemp('gpu_cache')}", *TINY, f"run.storage={tmp_path}",
        f"run.name={precision}", f"run.precision={precision}", "run.channels_last=auto", "data.batch_size=32",
        "schedule.max_steps=12", "schedule.warmup_steps=0", "run.log_every=1", "optimizer.lr=0.2",
        "optimizer.base_batch=32", "head.s=16", "head.m2=0.1", "checkpoint.every_minutes=0",
        "checkpoint.resume=never", "run.export_onnx=false", "eval.every_steps=0"])
    cfg.data.path = str(prepare_data(cfg))
    run = run_distributed(_train_on_gpu, 1, cfg.to_dict(), timeout=600, backend="nccl")[0]
    losses = run["losses"]
    # the backbone's parameters: float32 under bf16 autocast, float16 in DeepSpeed's fp16 engine (engine.py)
    assert run["precision"] == precision and run["dtype"] == {"bf16": "torch.float32", "fp16": "torch.float16"}[precision]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert run["pinned_staging"], "on a GPU the checkpoint staging buffers are page-locked (checkpoint.pin_host_memory)"
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    log = [json.loads(line) for line in (tmp_path / precision / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "eval"] == [0, 12]
    if precision == "fp16":  # the dynamic loss scale backs off at most a few times from 2^16
        assert run["skipped"] < 6
