"""Join (or start) a Ray cluster and run the training job as a Ray Train TorchTrainer.

One Ray Train worker per GPU; on a machine without GPUs, CPU workers with the gloo backend so
that exactly the same code path runs on a laptop, in CI and on a cluster. Data preparation that
must happen once (building the synthetic default, writing DALI's image-only index) happens here,
on the driver, before any worker starts, so workers never race to create files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fr_train.config import TrainConfig
from fr_train.console import log, setup_console
from fr_train.train.batch_plan import is_elastic


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
        from data_pipeline.synthetic import ensure_synthetic_dataset

        cache = Path(cfg.data.cache_dir).expanduser() / "synthetic"
        log.info(f"embedded default: synthetic identities (cached in {cache})")
        data_dir = ensure_synthetic_dataset(cache, cfg.data.synthetic)
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


class PlacementError(RuntimeError):
    """The cluster cannot hold the workers the run asks for (and, joined, did not grow in time)."""


def placeable_workers(placement: Placement, cpus_per_worker: int, nodes: list[dict[str, float]]) -> int:
    """How many workers of one placement fit on these nodes' total resources (each worker on one
    node: ``cpus_per_worker`` CPUs, and one GPU when on GPUs)."""
    fit = 0
    for res in nodes:
        n = int(res.get("CPU", 0) // cpus_per_worker) if cpus_per_worker else 10**9
        if placement.use_gpu:
            n = min(n, int(res.get("GPU", 0)))
        fit += n
    return fit


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_placement(placement: Placement, cfg: TrainConfig, local: bool) -> None:
    """Compare the request with the cluster before any worker starts. Ray itself would wait forever
    for room that a local cluster never gets (and Ctrl-C does not end that wait). A local cluster is
    refused at once; a joined one (which an autoscaler may grow) is waited for, with a message, up
    to run.placement_timeout_s. An elastic run needs room for run.min_workers to start."""
    per = f"{cfg.run.cpus_per_worker} CPU{' + 1 GPU' if placement.use_gpu else ''}"
    needed, key = placement.num_workers, "run.num_workers"
    if is_elastic(cfg.run):
        needed, key = cfg.run.min_workers, "run.min_workers"
    deadline = time.monotonic() + cfg.run.placement_timeout_s
    next_note = 0.0
    while True:
        nodes = _node_resources()
        fit = placeable_workers(placement, cfg.run.cpus_per_worker, nodes)
        if fit >= needed:
            return
        cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
        flag = "--min-workers" if key == "run.min_workers" else "--num-workers"
        problem = (f"{key}={needed} workers of {per} each do not fit this Ray cluster "
                   f"({len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs in all): it holds {fit}. Pass "
                   f"{flag} {max(fit, 1)} (or fewer)"
                   + (", or --set run.cpus_per_worker=1" if cfg.run.cpus_per_worker > 1 else "")
                   + ", or add nodes")
        if local:
            raise PlacementError(problem + " (a local cluster cannot grow)")
        now = time.monotonic()
        if now >= deadline:
            raise PlacementError(f"{problem}; waited run.placement_timeout_s={cfg.run.placement_timeout_s:g} s "
                                 "for the cluster to grow")
        if now >= next_note:
            log.info(f"waiting up to {deadline - now:.0f} s for room: {problem}")
            next_note = now + 30.0
        time.sleep(min(5.0, max(0.1, deadline - now)))


def launch(cfg: TrainConfig) -> int:
    setup_console()
    import os

    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.failures import clear_records, read_fatal
    from cluster.worker import train_loop
    from fr_train.checkpointing import check_run_directory

    cfg.run.name = resolve_run_name(cfg)
    storage = Path(cfg.run.storage).expanduser().resolve()
    cfg.run.storage = str(storage)
    run_dir = storage / cfg.run.name
    # Before anything else: a run name owns its directory (resume it, --overwrite it, or another
    # --name); the checkpoint it would resume from is checked here, on the driver (manifests and
    # sizes: rank 0 hashes every file before loading, and a large head's checkpoint is GBs).
    check_run_directory(run_dir, cfg, hash_files=False)
    data_dir = prepare_data(cfg)
    cfg.data.path = str(data_dir)

    # Inside `ray job submit` RAY_ADDRESS is set and this joins that cluster; otherwise it starts
    # a local one, on 127.0.0.1. The job's runtime env must not be re-specified here (Ray rejects
    # the merge). A local cluster keeps its dashboard (on 127.0.0.1): Ray Train's placement-group
    # cleaner queries the State API it serves, and logs a failure every few seconds without it.
    local = not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        if local:
            ray.init(log_to_driver=True, _node_ip_address="127.0.0.1", include_dashboard=True,
                     dashboard_host="127.0.0.1")
        else:
            ray.init(log_to_driver=True)
    placement = choose_placement(cfg, ray.cluster_resources())
    check_placement(placement, cfg, local)
    elastic = is_elastic(cfg.run)
    clear_records(run_dir)  # a new launch: the cause an earlier one ended on may be fixed
    log.info("resolved config:\n" + cfg.to_json())
    size = f"{cfg.run.min_workers} to {placement.num_workers} workers (elastic)" if elastic else \
        f"{placement.num_workers} worker(s)"
    log.info(f"run {cfg.run.name}: {size}, {'GPU' if placement.use_gpu else 'CPU'}, storage {storage}")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if placement.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            # Elastic: Ray restarts the group at any size in the range the cluster holds (node lost: at
            # once; room back: at the next resize check); every start resumes from the newest checkpoint.
            num_workers=(cfg.run.min_workers, placement.num_workers) if elastic else placement.num_workers,
            elastic_resize_monitor_interval_s=cfg.run.resize_interval_s,
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
            worker_runtime_env=_worker_env(local),
            # fr_train prints one line per logged step; Ray's own per-report lines only when asked.
            logging_config=LoggingConfig(log_level=cfg.run.ray_log_level),
        ),
    )
    try:
        result = trainer.fit()
        error: BaseException | None = result.error
    except Exception as exc:  # Ray 2.60 raises the run's failure (TrainingFailedError) from fit()
        result, error = None, exc
    if owns_ray:
        # Ray forwards the workers' output to this process asynchronously: disconnect first, so that
        # the run's last line below is the last line the user reads, not a late worker log line.
        ray.shutdown()
    fatal = read_fatal(run_dir)
    if fatal is not None:  # an error no restart fixes: the workers stopped retrying
        log.info(f"run {cfg.run.name} FAILED (not retried: a restart cannot fix it): {fatal['error']}")
        return 1
    if error is not None or result is None:
        log.info(f"run {cfg.run.name} FAILED after run.max_failures={cfg.run.max_failures} restarts: "
                 f"{root_cause(error)}; the newest checkpoint in {run_dir / 'checkpoints'} is intact: run the same "
                 "command to resume")
        return 1
    log.info(summarize_run(storage / cfg.run.name))
    if result.checkpoint is not None:
        log.info(f"Ray Train's latest checkpoint: {result.checkpoint.path}")
    return 0


def _worker_env(local: bool) -> dict[str, object]:
    """Runtime env of the Ray Train workers: cluster.preemption.defer_sigterm runs in each worker
    process before Ray's main loop (Ray Train's worker_runtime_env does not export a setup hook by
    itself, only ray.init does, so it is exported the way ray.init does it); on a local cluster,
    gloo binds the loopback interface."""
    from ray._private.runtime_env.setup_hook import export_setup_func_module

    hook = "cluster.preemption.defer_sigterm"
    env = dict(export_setup_func_module({"worker_process_setup_hook": hook}, hook))
    if local:
        env["env_vars"] = {**dict(env.get("env_vars") or {}), "GLOO_SOCKET_IFNAME": "lo"}  # type: ignore[arg-type]
    return env


def root_cause(error: BaseException | None) -> str:
    """The innermost error's one line out of Ray's wrapping (the worker's traceback is in its log)."""
    from cluster.failures import one_line

    if error is None:
        return "the run ended without a result"
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in text if ":" in line and line.split(":", 1)[0].split(".")[-1].endswith(("Error",
                                                                                                    "Exception"))]
    return raised[-1] if raised else one_line(error)


def summarize_run(run_dir: Path) -> str:
    """One line on how the run ended, from rank 0's JSON-lines log."""
    from fr_train.train.records import LOG_NAME, read_events

    log_path = run_dir / LOG_NAME
    records = read_events(run_dir)
    evals = [r for r in records if r.get("event") == "eval"]
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    if end is None:
        return f"run finished without an end record; see {log_path}"
    parts = [f"finished {end['step']} steps; model in {end['final_dir']}"]
    for name in dict.fromkeys(r["set"] for r in evals):
        first = next(r for r in evals if r["set"] == name)
        last = [r for r in evals if r["set"] == name][-1]
        parts.append(f"{name}: accuracy {first['accuracy']:.4f} (step {first['step']}) -> "
                     f"{last['accuracy']:.4f} (step {last['step']})")
    return "; ".join(parts)
