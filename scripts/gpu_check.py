"""The Python half of scripts/gpu_check.sh: refuse without a GPU, train without Ray, and report.

    python scripts/gpu_check.py preflight          exit 1 with the reason where there is no CUDA GPU
    python scripts/gpu_check.py train OUT -- ARGS  the training run of the check without Ray (one GPU)
    python scripts/gpu_check.py report OUT         one table (and OUT/gpu_check.json) from what ran

Why a Ray-free path: the device machines this project is checked on cannot always receive Ray's
wheel; the training run then drives the same Trainer on one GPU directly (what a Ray Train worker
runs), and the report says that Ray was skipped.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def preflight() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU is visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}). "
              "This check runs on a machine with NVIDIA GPUs and a CUDA build of torch (README: 'Installing on a "
              "GPU cluster'); on a CPU machine run `bash scripts/test.sh`.", file=sys.stderr)
        return 1
    print(f"gpu_check: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    return 0


def train(out: Path, args: list[str]) -> int:
    """`fr_train BACKBONE METHOD [--set k=v ...]` on cuda:0 as a world of one, without Ray."""
    import torch
    import torch.distributed as dist

    from cluster.launch import prepare_data
    from fr_train.config import build_config
    from fr_train.train.trainer import Trainer

    backbone, method, *rest = args
    overrides = [rest[i + 1] for i in range(len(rest)) if rest[i] == "--set"]
    cfg = build_config(backbone, method, overrides=overrides)
    cfg.data.path = str(prepare_data(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        Trainer(cfg, 0, 1, torch.device("cuda", 0)).fit()
    finally:
        dist.destroy_process_group()
    return 0


def _log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _run_figures(run_dir: Path) -> dict[str, Any]:
    import numpy as np

    log = _log(run_dir)
    train = [r for r in log if r.get("event") == "train"]
    evals = [r for r in log if r.get("event") == "eval"]
    start = next((r for r in log if r.get("event") == "start"), {})
    if not train:
        return {"ran": False}
    steady = train[len(train) // 4:] or train  # past the warm-up (cuDNN autotuning, DALI's first batches)
    fig: dict[str, Any] = {
        "ran": True, "steps": train[-1]["step"], "precision": start.get("precision"),
        "loss_first": round(train[0]["loss"], 4), "loss_last": round(train[-1]["loss"], 4),
        "images_per_s": round(float(np.median([r["images_per_s"] for r in steady])), 1),
        "peak_memory_gib": max(r.get("peak_memory_gib", 0.0) for r in train),
        "ended": any(r.get("event") == "end" for r in log),
    }
    if evals:
        fig["accuracy_first"], fig["accuracy_last"] = evals[0]["accuracy"], evals[-1]["accuracy"]
        data_dir = Path(start.get("data_dir", ""))
        if (data_dir / "synth_val.bin").is_file():
            from fr_train.evaluation.baseline import raw_pixel_baseline

            fig["raw_pixels"] = round(raw_pixel_baseline(data_dir / "synth_val.bin").accuracy, 4)
    return fig


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception:
        return "not installed"


def report(out: Path) -> int:
    import torch

    status = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else {}
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "none",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": _version("deepspeed"),
                     "nvidia.dali": _version("nvidia.dali"), "ray": _version("ray")},
        "status": status,
        "train": _run_figures(out / "runs" / "gpu-check-r50"),
        "ray_job": _run_figures(out / "runs" / "gpu-check-ray"),
    }
    t = result["train"]
    checks = {
        "pytest -m gpu": status.get("pytest") == 0,
        "r50 arcface: loss falls": t.get("ran") and t["loss_last"] < t["loss_first"],
        "r50 arcface: accuracy > raw pixels + 0.10": t.get("ran") and "raw_pixels" in t
        and t["accuracy_last"] > t["raw_pixels"] + 0.10,
        "ray job submit r100 vpl": "skipped (ray not installed)" if status.get("ray") == "skipped"
        else status.get("ray") == 0 and result["ray_job"].get("ended", False),
    }
    result["checks"] = checks
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"\n## gpu_check — {result['date']}\n\n| item | value |\n|---|---|")
    print(f"| device | {result['device']} |")
    print("| versions | " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + " |")
    for name, fig in (("r50 arcface (synthetic 112x112, DALI mixed)", t), ("ray job: r100 vpl", result["ray_job"])):
        if fig.get("ran"):
            acc = (f"; accuracy {fig['accuracy_first']:.4f} → {fig['accuracy_last']:.4f} (raw pixels "
                   f"{fig.get('raw_pixels', float('nan')):.4f})" if "accuracy_first" in fig else "")
            print(f"| {name} | {fig['steps']} steps {fig['precision']}: loss {fig['loss_first']} → {fig['loss_last']}"
                  f"{acc}; {fig['images_per_s']} img/s; peak {fig['peak_memory_gib']} GiB |")
    for name, ok in checks.items():
        print(f"| check: {name} | {ok if isinstance(ok, str) else ('PASS' if ok else 'FAIL')} |")
    print(f"\n{json.dumps(result)}")
    return 0 if all(ok is True or isinstance(ok, str) for ok in checks.values()) else 1


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "preflight":
        return preflight()
    if argv[0] == "train":
        return train(Path(argv[1]), [a for a in argv[2:] if a != "--"])
    if argv[0] == "report":
        return report(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
