"""Checkpoint stall vs write time as the head grows: async save vs a synchronous save, and load time.

For each class count: a real ``PartialFC`` (512-d rows and SGD momentum rows: ≈ 4 KiB per class in
fp32, half that with ``--storage-dtype bfloat16``) and a real iresnet backbone with its torch SGD
state, on ``--device`` (on CUDA the stall is the device→host copy). They are saved the Trainer's
way: ``CheckpointManager.save_states`` over the components (the head hands over its live rows; the
manager copies every tensor into its host staging buffers, pinned on CUDA). Per configuration, in
one process:

- async, first save: ``stall`` = ``save_states`` (what the training loop waits for: the staging
  buffers are allocated, then filled), then ``total`` until the background write is committed
  (``wait``); meanwhile the loop keeps running head steps (sample rate 0.1, batch 128), whose mean
  time is compared with idle steps: the write shares the host's cores and memory bandwidth with
  training. ``lost`` = stall + that slowdown: the training time the async save costs, to compare
  with ``sync`` (all of which is lost).
- async, steady state: the next save, the same way, into the buffers of the first (``stall 2nd``,
  ``lost 2nd``): what every later checkpoint of a run costs.
- sync (baseline): ``save_states(sync=True)`` (the loop waits for everything).
- load: ``find_latest`` (sha256 of every file) + ``payload_for`` + ``head.load_state_dict``.

    python benchmarks/checkpoint.py                         # 100k, 250k, 500k, 1M classes
    python benchmarks/checkpoint.py --classes 100000 --backbone r18
    python benchmarks/checkpoint.py --device cuda --backbone r100 --classes 2000000
    python benchmarks/checkpoint.py --device cuda --backbone r100 --classes 10000000 --storage-dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fr_train.backbones import build_backbone
from fr_train.checkpointing import CheckpointManager, find_latest
from fr_train.checkpointing.rng import ProcessRng
from fr_train.checkpointing.stateful import CheckpointStates, State
from fr_train.config import TrainConfig
from fr_train.heads import CombinedMargin, PartialFC
from fr_train.train.state import TrainState


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _head_step(head: PartialFC, batch: int, gen: torch.Generator) -> float:
    device = head.weight.device
    _sync(device)
    t0 = time.perf_counter()
    x = torch.randn(batch, head.embedding_size, generator=gen, device=device)
    y = torch.randint(0, head.num_classes, (batch,), generator=gen, device=device)
    head(x, y).backward()
    assert head.optimizer is not None
    head.optimizer.step()
    head.optimizer.zero_grad()
    _sync(device)
    return time.perf_counter() - t0


def _async_save(mgr: CheckpointManager, train: TrainState, meta: dict[str, Any], head: PartialFC,
                gen: torch.Generator, idle: float) -> dict[str, Any]:
    """One asynchronous save while the loop keeps stepping: stall, total, lost, steps during the write."""
    train.step += 1
    t0 = time.perf_counter()
    mgr.save_states(train.step, meta)
    stall = time.perf_counter() - t0
    during: list[float] = []
    assert mgr._pending is not None
    thread: threading.Thread = mgr._pending.thread
    while thread.is_alive():
        during.append(_head_step(head, 128, gen))
    mgr.wait()
    total = time.perf_counter() - t0
    assert mgr.last_timing is not None
    return {"stall": stall, "total": total, "during": during, "timing": mgr.last_timing,
            # Training time the async save costs: the stall plus the slowdown of the steps that overlapped
            # the write (compare with sync_total_s, which the loop loses entirely).
            "lost": stall + max(0.0, sum(during) - len(during) * idle)}


def run(classes: int, backbone_name: str, root: Path, cfg: dict[str, Any], idle_steps: int,
        device: torch.device, storage_dtype: torch.dtype) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    head = PartialFC(classes, 512, CombinedMargin(), sample_rate=0.1, seed=0, device=device,
                     storage_dtype=storage_dtype)
    head.make_optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    backbone = build_backbone(backbone_name, embedding_size=512, image_size=112).to(device)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    for p in backbone.parameters():  # a momentum buffer per parameter, as after the first step
        p.grad = torch.zeros_like(p)
    opt.step()
    gen = torch.Generator(device=device).manual_seed(0)
    _head_step(head, 128, gen)  # warm-up, and momentum rows exist
    idle = [_head_step(head, 128, gen) for _ in range(idle_steps)]
    meta = {"epoch": 0, "samples_seen": 0, "num_classes": classes, "config": cfg}
    train = TrainState()
    states = CheckpointStates((State("train", train), State("head", head), State("rng", ProcessRng()),
                               State("backbone", backbone, shared=True), State("optimizer", opt, shared=True)))
    # As the Trainer builds it: pinned staging buffers when the state lives on a GPU.
    mgr = CheckpointManager(root, keep=1, rank=0, world=1, states=states, pin_memory=device.type == "cuda")
    idle_mean = sum(idle) / len(idle)

    # Async: the loop stalls for the host copy only; the first save allocates the staging buffers,
    # the second reuses them (each save replaces the previous one: keep=1).
    first = _async_save(mgr, train, meta, head, gen, idle_mean)
    size = first["timing"].bytes_written
    gc.collect()
    steady = _async_save(mgr, train, meta, head, gen, idle_mean)
    gc.collect()

    # Sync baseline: the same save, waited for.
    train.step += 1
    t0 = time.perf_counter()
    mgr.save_states(train.step, meta, sync=True)
    sync_total = time.perf_counter() - t0
    staging_bytes = mgr.staging.nbytes
    gc.collect()
    peak_device_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    t0 = time.perf_counter()
    ckpt = find_latest(root)
    verify = time.perf_counter() - t0
    assert ckpt is not None and ckpt.step == train.step
    state = ckpt.payload_for(0, 1)
    head.load_state_dict(state["head"])
    loaded_shared = ckpt.shared()
    assert loaded_shared is not None
    backbone.load_state_dict(loaded_shared["backbone"])
    load_total = time.perf_counter() - t0
    mgr.close()  # releases the staging buffers
    del state, loaded_shared, ckpt, head, backbone, opt, states
    gc.collect()
    during = first["during"]
    return {
        "classes": classes, "device": str(device), "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "peak_device_gib": peak_device_gb, "bytes": size,
        # First save: the staging buffers are allocated (pinned on CUDA) and filled.
        "async_stall_s": first["stall"], "async_total_s": first["total"], "async_lost_s": first["lost"],
        "first_staged_bytes": first["timing"].staged_bytes,
        # Steady state: the next save reuses them (steady_staged_bytes 0: nothing allocated).
        "steady_stall_s": steady["stall"], "steady_total_s": steady["total"], "steady_lost_s": steady["lost"],
        "steady_staged_bytes": steady["timing"].staged_bytes, "staging_bytes": staging_bytes,
        "sync_total_s": sync_total, "write_mb_s": size / 2**20 / first["timing"].write,
        "step_idle_s": idle_mean, "step_during_write_s": sum(during) / max(len(during), 1),
        "steps_during_write": len(during), "verify_s": verify, "load_total_s": load_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 250_000, 500_000, 1_000_000])
    ap.add_argument("--backbone", default="r50")
    ap.add_argument("--idle-steps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the head and backbone live")
    ap.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="head rows and their momentum (bfloat16 halves both)")
    ap.add_argument("--root", default=None, help="directory for the checkpoints (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = TrainConfig().to_dict()
    base = Path(args.root or tempfile.mkdtemp(prefix="fr_ckpt_bench_"))
    results = []
    print(f"{'classes':>9} {'GiB':>6} {'stall s':>8} {'lost s':>7} {'async s':>8} {'stall 2nd':>9} {'lost 2nd':>8} "
          f"{'sync s':>8} {'MB/s':>6} {'step idle':>9} {'step busy':>9} {'verify s':>8} {'load s':>7}")
    try:
        for classes in args.classes:
            root = base / f"c{classes}"
            r = run(classes, args.backbone, root, cfg, args.idle_steps, torch.device(args.device),
                    getattr(torch, args.storage_dtype))
            shutil.rmtree(root, ignore_errors=True)
            results.append(r)
            print(f"{r['classes']:>9} {r['bytes'] / 2**30:>6.2f} {r['async_stall_s']:>8.2f} {r['async_lost_s']:>7.2f} "
                  f"{r['async_total_s']:>8.2f} {r['steady_stall_s']:>9.2f} {r['steady_lost_s']:>8.2f} "
                  f"{r['sync_total_s']:>8.2f} {r['write_mb_s']:>6.0f} {r['step_idle_s']:>9.3f} "
                  f"{r['step_during_write_s']:>9.3f} {r['verify_s']:>8.2f} {r['load_total_s']:>7.2f}", flush=True)
    finally:
        if args.root is None:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"benchmark": "checkpoint", "backbone": args.backbone, "host": platform.node(),
                      "cpus": torch.get_num_threads(), "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                      "results": results}))


if __name__ == "__main__":
    main()
