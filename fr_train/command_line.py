"""What the `fr_train BACKBONE METHOD [options]` command line means: its flags, the config keys they
set, and `fr_train list`. It turns argv into one validated TrainConfig and launches nothing.

The command line is thin on purpose: the common options have flags, everything else is a
validated `--set key=value` on the config tree (fr_train/config.py). The entry point that runs the
command (and launches the Ray job) is cluster/cli.py: launching needs cluster, and fr_train must not
depend on it (the dependencies go cluster → fr_train → data_pipeline).
"""

from __future__ import annotations

import argparse

from fr_train.config import METHODS, TrainConfig, build_config, valid_keys

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
    """The run's TrainConfig from ``build_parser()``'s arguments; raises ConfigError naming the bad key."""
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
    """`fr_train list`: what BACKBONE, METHOD and `--set` accept, read from the tables themselves."""
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
