"""`fr_eval MODEL --bin SET.bin [...]`: verification accuracy and TAR@FAR of a saved backbone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def parse_device(text: str) -> torch.device:
    """``--device``: a torch device this machine has (cpu, cuda, cuda:N), else one line saying so."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: pass cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: fr_eval runs on cpu or cuda[:N]")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device; pass --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), "
                                             f"cuda:0 to cuda:{count - 1}")
    return device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fr_eval", description="Evaluate a saved fr_train backbone on .bin "
                                "verification sets (LFW 10-fold protocol with flip, TAR@FAR).")
    p.add_argument("model", help="a run's final/ directory (backbone.safetensors + model.json) or the "
                   "safetensors file itself (then --backbone is required)")
    p.add_argument("--bin", dest="bins", action="append", required=True, help=".bin set (repeatable)")
    p.add_argument("--backbone", default=None, help="backbone name when MODEL has no model.json beside it")
    p.add_argument("--embedding-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="input side (default: model.json's, else 112)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where there is one)")
    args = p.parse_args(argv)

    from data_pipeline.errors import DataFormatError
    from fr_train.evaluation.runner import evaluate_verification, load_verification_set
    from fr_train.export import MODEL_JSON, UnsafeWeightsError, load_backbone, read_model_info

    model_path = Path(args.model)
    if not model_path.exists():
        print(f"fr_eval: error: {model_path}: no such model directory or weights file", file=sys.stderr)
        return 1
    weights = model_path / "backbone.safetensors" if model_path.is_dir() else model_path
    meta_path = weights.parent / MODEL_JSON
    name, emb, size = args.backbone, args.embedding_size, args.image_size
    try:
        if meta_path.is_file():
            saved = read_model_info(meta_path)
            name = name or saved["backbone"]
            emb = emb or saved["embedding_size"]
            size = size or saved["image_size"]
        if name is None:
            print(f"fr_eval: no model.json beside {weights}; pass --backbone", file=sys.stderr)
            return 2
        size = size or 112
        # Strict: a missing, unexpected or mis-shaped entry names the file and the backbone.
        model = load_backbone(name, weights, embedding_size=emb or 512, image_size=size)
    except (OSError, ValueError, UnsafeWeightsError) as e:  # JSONDecodeError is a ValueError
        where = f"{meta_path}: " if isinstance(e, json.JSONDecodeError) else ""
        print(f"fr_eval: error: {where}{e}", file=sys.stderr)
        return 1
    device = args.device
    model.to(device).eval()
    sets = []
    for b in args.bins:  # all of them before any scoring: a bad set fails the command at once
        try:
            sets.append(load_verification_set(b, (size, size)))
        except (DataFormatError, OSError) as e:
            print(f"fr_eval: error: {e}", file=sys.stderr)
            return 1
    for vs in sets:
        r = evaluate_verification(model, vs, args.batch_size, device)
        print(json.dumps({"set": vs.name, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
