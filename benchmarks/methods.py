"""Every method preset on the same synthetic benchmark: held-out verification after the same run.

Same backbone, data, steps, optimizer and seeds for every preset; only the method differs (its
preset's hyperparameters, except VPL's start iteration, scaled to the run length). Each run is the
real training loop (fr_train.train.trainer.Trainer: DALI CPU decode, DeepSpeed, the sharded head) in one
process; the table gives the mean ± std over seeds of the 10-fold verification accuracy and
TAR@FAR=1e-3 on the held-out identities of synth_val.bin, with the raw-pixel baseline of the same
pairs. Prints a table and JSON.

    python benchmarks/methods.py                              # all presets, seeds 0 1 2
    python benchmarks/methods.py --methods arcface cosface --seeds 0 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fr_train.config import METHODS, build_config


def recipe(args: argparse.Namespace, seed: int, storage: Path, name: str) -> list[str]:
    """The shared short-run recipe (also tests/test_method_learning.py's): everything but the method."""
    return [
        f"data.cache_dir={args.cache}", f"data.synthetic.image_size={args.image_size}",
        f"data.synthetic.num_identities={args.identities}", "data.synthetic.images_per_identity=16",
        "data.synthetic.holdout_identities=40", "data.synthetic.num_pairs=400",
        f"data.batch_size={args.batch}", "data.num_threads=2",
        f"run.seed={seed}", f"head.seed={seed}", f"run.storage={storage}", f"run.name={name}",
        "checkpoint.resume=never", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
        f"schedule.max_steps={args.steps}", f"schedule.warmup_steps={args.steps // 10}",
        f"optimizer.lr={args.lr}", f"optimizer.base_batch={args.batch}",
        "eval.every_steps=0", f"run.log_every={args.steps}",
        f"head.vpl_start_iter={args.steps // 4}", "head.vpl_delta_t=16", "run.export_onnx=false",
    ]


def run_one(method: str, seed: int, args: argparse.Namespace, storage: Path, backbone: str | None = None,
            name: str | None = None) -> dict[str, Any]:
    from cluster.launch import prepare_data
    from fr_train.train.trainer import Trainer

    extra = [f"distill.teacher={args.teacher}"] if method == "distill" else []
    cfg = build_config(backbone or args.backbone, method,
                       overrides=recipe(args, seed, storage, name or f"{method}-s{seed}") + extra)
    cfg.data.path = str(prepare_data(cfg))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))
    trainer.fit()
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (storage / cfg.run.name / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    last = evals[-1]
    return {"method": method, "seed": seed, "accuracy": last["accuracy"], "tar_at_far_1e-3": last["tar_at_far_1e-3"],
            "accuracy_step0": evals[0]["accuracy"], "final_loss": trainer.state.history[-1]["loss"],
            "seconds": seconds, "data_dir": cfg.data.path}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backbone", default="mbf")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.2, help="at the global batch (base_batch = --batch)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--identities", type=int, default=64)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fr_train_methods_cache"))
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--teacher", default=None,
                    help="distill's teacher (a run's final/); default: train one first (--teacher-backbone, "
                         "arcface, 2 × --steps, seed 0)")
    ap.add_argument("--teacher-backbone", default="r18")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("LOCAL_RANK", "0")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dist.init_process_group("gloo", rank=0, world_size=1)
    storage = Path(tempfile.mkdtemp(prefix="fr_methods_"))
    runs = []
    teacher_run = None
    if "distill" in args.methods and args.teacher is None:
        steps = args.steps
        args.steps = 2 * steps
        teacher_run = run_one("arcface", 0, args, storage, backbone=args.teacher_backbone, name="teacher")
        args.steps = steps
        args.teacher = str(storage / "teacher" / "final")
        print(f"[methods] teacher {args.teacher_backbone} arcface ({2 * steps} steps): accuracy "
              f"{teacher_run['accuracy']:.4f}", flush=True)
    for method in args.methods:
        for seed in args.seeds:
            r = run_one(method, seed, args, storage)
            runs.append(r)
            print(f"[methods] {method} seed {seed}: accuracy {r['accuracy']:.4f} TAR@1e-3 {r['tar_at_far_1e-3']:.4f} "
                  f"loss {r['final_loss']:.3f} ({r['seconds']:.0f}s)", flush=True)
    dist.destroy_process_group()

    from fr_train.evaluation.baseline import raw_pixel_baseline

    baseline = raw_pixel_baseline(Path(runs[0]["data_dir"]) / "synth_val.bin")
    rows = []
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        acc, acc_sd = _mean_std([r["accuracy"] for r in mine])
        tar, tar_sd = _mean_std([r["tar_at_far_1e-3"] for r in mine])
        rows.append({"method": method, "accuracy_mean": acc, "accuracy_std": acc_sd, "tar_mean": tar, "tar_std": tar_sd,
                     "seconds_per_run": statistics.fmean(r["seconds"] for r in mine)})
    print(f"\n{args.backbone}, {args.steps} steps × batch {args.batch}, {args.image_size}×{args.image_size}, "
          f"{args.identities} identities, seeds {args.seeds}; raw-pixel baseline {baseline.accuracy:.4f}")
    print("| method | accuracy (mean ± std) | TAR@FAR=1e-3 (mean ± std) | s/run |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
              f"{row['tar_mean']:.4f} ± {row['tar_std']:.4f} | {row['seconds_per_run']:.0f} |")
    print(f"| raw pixels | {baseline.accuracy:.4f} | | |")
    if teacher_run is not None:
        print(f"distill's teacher: {args.teacher_backbone} arcface, {2 * args.steps} steps, seed 0: accuracy "
              f"{teacher_run['accuracy']:.4f}, TAR@FAR=1e-3 {teacher_run['tar_at_far_1e-3']:.4f}")
    result = {"benchmark": "methods", "host": platform.node(), "torch": torch.__version__, "args": vars(args),
              "raw_pixel_accuracy": baseline.accuracy, "rows": rows, "runs": runs, "teacher": teacher_run}
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
