"""`fr_train BACKBONE METHOD [options]`: parse the command line into one TrainConfig and launch.

The command line is thin on purpose: the common options have flags, everything else is a
validated `--set key=value` on the config tree (fr_train/config.py).
"""

from __future__ import annotations

import argparse
import sys

from fr_train.config import METHODS, ConfigError, TrainConfig, build_config, valid_keys

EPILOG = """\
examples:
  fr_train r18 arcface                          # embedded default: synthetic identities, local Ray, CPU
  fr_train r100 vpl --data /data/ms1m --num-workers 8 --name ms1m-vpl
  fr_train r50 cosface --data /data/ms1m --set head.sample_rate=0.1 --set optimizer.lr=0.2
  ray job submit --address http://HEAD:8265 -- fr_train r100 vpl --data /data/ms1m
  fr_train r100 arcface --data /data/ms1m --num-workers 8 --min-workers 4 --set data.sampler=global
                                                # elastic: 4 to 8 GPUs, the same global batch
  fr_train list                                 # backbones, methods and every --set key
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fr_train",
        description="Train a face recognition model: a Ray Train job of DeepSpeed workers with a "
        "sharded prototype head. With no --data, trains on an embedded synthetic dataset.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("backbone", help="backbone name (see `fr_train list`), e.g. r18, r50, r100, mbf")
    p.add_argument("method", help="method preset (see `fr_train list`), e.g. arcface, cosface, vpl")
    p.add_argument("--data", default=None,
                   help="dataset directory with train.rec/train.idx/property (default: the embedded "
                   "synthetic dataset, built once and cached)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="Ray Train workers, one per GPU (default: all GPUs, or 2 CPU workers without GPUs)")
    p.add_argument("--min-workers", type=int, default=None,
                   help="elastic run: train on anything from this many workers up to --num-workers, resizing as "
                   "nodes leave and return, the global batch unchanged (run.min_workers; needs "
                   "--set data.sampler=global or pk; default: a fixed size)")
    p.add_argument("--name", default=None, help="run name; the same name resumes the run (default: generated)")
    p.add_argument("--storage", default=None, help="run storage path, shared by all nodes (default: ~/fr_train_runs)")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file of config overrides")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set head.sample_rate=0.1")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (default: run all epochs)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default: 20)")
    p.add_argument("--resume", default=None, metavar="auto|never|PATH",
                   help="auto: continue the run of the same --name from its newest valid checkpoint (default); "
                   "never: start fresh; PATH: a checkpoint directory (STORAGE/RUN/checkpoints/step_*)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in place of the run of the same --name: deletes its checkpoints, final/ "
                   "and train_log.jsonl at the start (run.overwrite=true; implies --resume never). Without it a "
                   "new run refuses a run directory that holds checkpoints or final/")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flag_overrides = []
    for flag, key in (("data", "data.path"), ("num_workers", "run.num_workers"), ("min_workers", "run.min_workers"),
                      ("name", "run.name"),
                      ("storage", "run.storage"), ("max_steps", "schedule.max_steps"),
                      ("epochs", "schedule.epochs"), ("resume", "checkpoint.resume")):
        value = getattr(args, flag)
        if value is not None:
            flag_overrides.append(f"{key}={value}")
    if args.overwrite:
        flag_overrides.append("run.overwrite=true")
        if args.resume is None:
            flag_overrides.append("checkpoint.resume=never")  # replacing a run means not continuing it
    # explicit --set overrides win over the convenience flags
    return build_config(args.backbone, args.method, args.config, flag_overrides + list(args.overrides))


def print_list() -> None:
    from fr_train.backbones import BACKBONES

    print("backbones:")
    for name, spec in BACKBONES.items():
        print(f"  {name:<12} {spec.description}")
    print("methods:")
    for name, (description, _) in METHODS.items():
        print(f"  {name:<12} {description}")
    print("config keys (--set KEY=VALUE):")
    for key in valid_keys():
        print(f"  {key}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        print_list()
        return 0
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"fr_train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    from cluster.launch import PlacementError, launch

    try:
        return launch(cfg)
    except (PlacementError, ValueError, FileNotFoundError) as exc:  # the request or the data: one line, no trace
        print(f"fr_train: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
