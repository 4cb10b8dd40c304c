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
    p = argparse.ArgumentParser(
        prog="fr_eval", description="Evaluate a face model on .bin verification sets (LFW 10-fold protocol with "
        "flip, TAR@FAR) and on IJB-B/IJB-C (1:1 TAR@FAR, 1:N rank-k and TPIR@FPIR), one JSON line per result.")
    p.add_argument("model", help="a run's final/ directory (backbone.safetensors + model.json), a run directory, "
                   "a weights file (.safetensors/.pt; then --backbone is required) or an ONNX model (.onnx)")
    p.add_argument("--bin", dest="bins", action="append", default=[], help=".bin set (repeatable)")
    p.add_argument("--ijb", default=None, metavar="DIR", help="insightface's IJB release directory (meta/ and "
                   "loose_crop/; or its parent holding IJBC/ or IJBB/)")
    p.add_argument("--ijb-target", choices=["IJBB", "IJBC"], default=None,
                   help="which release under --ijb (default: read from the meta file names)")
    p.add_argument("--features", type=Path, default=None, metavar="FILE",
                   help="IJB per-image features: read from FILE when it exists (re-scoring takes seconds), else "
                   "extracted and saved there")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="IJB: do not add the mirror's embedding")
    p.add_argument("--no-norm-weight", dest="norm_weight", action="store_false",
                   help="IJB: L2-normalise each image's feature (default: its norm weights it, as insightface)")
    p.add_argument("--no-detector-weight", dest="detector_weight", action="store_false",
                   help="IJB: do not multiply image features by the detector score of the landmark file")
    p.add_argument("--threads", type=_positive, default=4, help="IJB: image decode/align threads")
    p.add_argument("--backbone", default=None, help="backbone name when MODEL has no model.json beside it")
    p.add_argument("--embedding-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="input side (default: model.json's, else 112)")
    p.add_argument("--input-mean", type=float, default=127.5, help="the model's input normalisation "
                   "(x - mean) / std (default 127.5, 127.5: fr_train's and insightface's)")
    p.add_argument("--input-std", type=float, default=127.5)
    p.add_argument("--input-bgr", action="store_true", help="the model takes BGR channels (default RGB)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where there is one)")
    args = p.parse_args(argv)
    if not args.bins and args.ijb is None:
        p.error("nothing to evaluate: pass --bin SET.bin and/or --ijb DIR")
    if args.input_std == 0:
        p.error("--input-std must not be 0")

    from data_pipeline.errors import DataFormatError
    from fr_train.evaluation.embedders import InputNorm, MissingBackboneError, load_embedder
    from fr_train.evaluation.runner import evaluate_verification, load_verification_set
    from fr_train.export import UnsafeWeightsError

    try:
        embedder = load_embedder(args.model, backbone=args.backbone, embedding_size=args.embedding_size,
                                 image_size=args.image_size, device=args.device,
                                 norm=InputNorm(args.input_mean, args.input_std, args.input_bgr))
    except MissingBackboneError as e:  # a usage problem: the command line lacks a flag
        print(f"fr_eval: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, UnsafeWeightsError) as e:  # ModelLoadError is a ValueError
        print(f"fr_eval: error: {e}", file=sys.stderr)
        return 1
    size = embedder.image_size
    sets = []
    for b in args.bins:  # all of them before any scoring: a bad set fails the command at once
        try:
            sets.append(load_verification_set(b, (size, size)))
        except (DataFormatError, OSError) as e:
            print(f"fr_eval: error: {e}", file=sys.stderr)
            return 1
    for vs in sets:
        r = evaluate_verification(embedder, vs, args.batch_size, args.device)
        print(json.dumps({"set": vs.name, **r}), flush=True)
    if args.ijb is not None:
        from fr_train.evaluation.ijb import IJBOptions, evaluate_ijb

        options = IJBOptions(flip=args.flip, norm_weight=args.norm_weight, detector_weight=args.detector_weight,
                             batch_size=args.batch_size, threads=args.threads, features=args.features)
        try:
            records = evaluate_ijb(embedder, args.ijb, args.ijb_target, options)
        except (DataFormatError, OSError, ValueError) as e:
            print(f"fr_eval: error: {e}", file=sys.stderr)
            return 1
        for record in records:
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
