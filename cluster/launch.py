"""Join (or start) a Ray cluster and run the training job as a Ray Train TorchTrainer.

One Ray Train worker per GPU; on a machine without GPUs, CPU workers with the gloo backend so
that exactly the same code path runs on a laptop, in CI and on a cluster. Data preparation that
must happen once (building the synthetic default, writing DALI's image-only index) happens here,
on the driver, before any worker starts, so workers never race to create files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fr_train.config import TrainConfig


@dataclass(frozen=True)
class Placement:
    num_workers: int
    use_gpu: bool


def resolve_run_name(cfg: TrainConfig) -> str:
    if cfg.run.name:
        return cfg.run.name
    return f"{cfg.backbone.name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_data(cfg: TrainConfig) -> Path:
    """Return the dataset directory, building the synthetic default once (cached) if none is given."""
    from data_pipeline.dali import prepare_dali_index

    if cfg.data.path:
        data_dir = Path(cfg.data.path).expanduser().resolve()
    else:
        from data_pipeline.synthetic import SyntheticConfig, ensure_synthetic_dataset

        s = cfg.data.synthetic
        synth = SyntheticConfig(
            num_identities=s.num_identities,
            images_per_identity=s.images_per_identity,
            holdout_identities=s.holdout_identities,
            num_pairs=s.num_pairs,
            difficulty=s.difficulty,
            image_size=s.image_size,
            seed=s.seed,
        )
        cache = Path(cfg.data.cache_dir).expanduser() / "synthetic"
        print(f"[fr_train] embedded default: synthetic identities (cached in {cache})", flush=True)
        data_dir = ensure_synthetic_dataset(cache, synth)
    prepare_dali_index(data_dir)
    return data_dir


def choose_placement(cfg: TrainConfig, cluster_resources: dict[str, float]) -> Placement:
    gpus = int(cluster_resources.get("GPU", 0))
    if cfg.run.use_gpu == "yes" and gpus == 0:
        raise RuntimeError("run.use_gpu=yes but the Ray cluster has no GPU; set run.use_gpu=auto or no")
    use_gpu = gpus > 0 and cfg.run.use_gpu != "no"
    if cfg.run.num_workers:
        n = cfg.run.num_workers
    elif use_gpu:
        n = gpus
    else:
        n = max(1, min(2, int(cluster_resources.get("CPU", 1)) // cfg.run.cpus_per_worker))
    return Placement(num_workers=n, use_gpu=use_gpu)


def launch(cfg: TrainConfig) -> int:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fr_train.worker import train_loop

    cfg.run.name = resolve_run_name(cfg)
    storage = Path(cfg.run.storage).expanduser().resolve()
    cfg.run.storage = str(storage)
    data_dir = prepare_data(cfg)
    cfg.data.path = str(data_dir)

    # Inside `ray job submit` RAY_ADDRESS is set and this joins that cluster; otherwise it starts
    # a local one. The job's runtime env must not be re-specified here (Ray rejects the merge).
    # A local cluster keeps its dashboard (on 127.0.0.1): Ray Train's placement-group cleaner
    # queries the State API it serves, and logs a failure every few seconds without it.
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    placement = choose_placement(cfg, ray.cluster_resources())
    print("[fr_train] resolved config:\n" + cfg.to_json(), flush=True)
    print(f"[fr_train] run {cfg.run.name}: {placement.num_workers} worker(s), "
          f"{'GPU' if placement.use_gpu else 'CPU'}, storage {storage}", flush=True)

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if placement.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if placement.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # fr_train prunes its own checkpoints (checkpoint.keep, never a newer than the one resumed
            # from); Ray only records the ones reported.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            # SIGTERM to a worker: checkpoint the current step on every rank before Ray exits it.
            worker_runtime_env=_sigterm_hook_env(),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        print(f"[fr_train] run {cfg.run.name} FAILED: {result.error}", flush=True)
        return 1
    print(summarize_run(storage / cfg.run.name), flush=True)
    if result.checkpoint is not None:
        print(f"[fr_train] Ray Train's latest checkpoint: {result.checkpoint.path}", flush=True)
    return 0


def _sigterm_hook_env() -> dict[str, object]:
    """Runtime env of the Ray Train workers that runs fr_train.preemption.defer_sigterm in each worker
    process before Ray's main loop. Ray Train's worker_runtime_env does not export a setup hook by
    itself (only ray.init does), so the hook is exported the way ray.init does it."""
    from ray._private.runtime_env.setup_hook import export_setup_func_module

    hook = "fr_train.preemption.defer_sigterm"
    return dict(export_setup_func_module({"worker_process_setup_hook": hook}, hook))


def summarize_run(run_dir: Path) -> str:
    """One line on how the run ended, from rank 0's JSON-lines log."""
    log = run_dir / "train_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    evals = [r for r in records if r.get("event") == "eval"]
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    if end is None:
        return f"[fr_train] run finished without an end record; see {log}"
    parts = [f"[fr_train] finished {end['step']} steps; model in {end['final_dir']}"]
    for name in dict.fromkeys(r["set"] for r in evals):
        first = next(r for r in evals if r["set"] == name)
        last = [r for r in evals if r["set"] == name][-1]
        parts.append(f"{name}: accuracy {first['accuracy']:.4f} (step {first['step']}) -> "
                     f"{last['accuracy']:.4f} (step {last['step']})")
    return "; ".join(parts)
