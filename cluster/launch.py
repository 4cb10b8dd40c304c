"""Join (or start) a Ray cluster and run the training job as a Ray Train TorchTrainer.

One Ray Train worker per GPU; on a machine without GPUs, CPU workers with the gloo backend so
that exactly the same code path runs on a laptop, in CI and on a cluster. Data preparation that
must happen once (building the synthetic default, writing DALI's image-only index) happens here,
on the driver, before any worker starts, so workers never race to create files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.dataset import FaceRecordDataset
from data_pipeline.errors import data_error
from fr_train.checkpointing.rundir import RunStart
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


def check_image_size(dataset: FaceRecordDataset) -> None:
    """The images are the property file's size (the first image's header is read): fr_train decodes
    at that size and does not resize, and a property of another size otherwise surfaced in every
    worker at its first batch, after Ray started."""
    found = dataset.first_image_size()
    height, width = dataset.image_size
    if found is not None and found != (height, width):
        h, w = found
        raise data_error(dataset.property_path, f"image key {int(dataset.image_keys[0])} of {dataset.rec_path.name}",
                         f"the images are {w}x{h} (WxH) but the property file says {width}x{height}",
                         f"Correct the property file ({dataset.num_classes},{h},{w}), or re-pack the source images "
                         f"at {width}x{height} (fr_pack --image-size {height} {width} --resize)")


def check_resume_compatible(start: RunStart, cfg: TrainConfig, num_classes: int) -> None:
    """Refuse, before Ray starts, to resume a checkpoint into a different model or dataset (another
    backbone, embedding size, margin, VPL setting, optimizer, or class count), naming the field:
    the worker's own check would otherwise meet it only after the cluster and the workers started.
    What may change across a resume and why: docs/resume.md."""
    from fr_train.checkpointing import load_checkpoint

    path = start.resume_path
    if path is None:
        return
    checkpoint = start.resume_from if start.resume_from is not None else load_checkpoint(path, hash_files=False)
    checkpoint.check_compatible(cfg.to_dict(), num_classes)


def check_batch_fits(cfg: TrainConfig, num_workers: int, data_dir: Path) -> None:
    """Refuse, before any worker starts, a batch that leaves an epoch without a step at a size the
    run may take (else every worker fails on it after Ray started, once per allowed restart)."""
    from data_pipeline.dali import indexed_image_count
    from fr_train.train.batch_plan import empty_epoch_error, plan_batches

    images = indexed_image_count(data_dir)
    sizes = range(cfg.run.min_workers, num_workers + 1) if is_elastic(cfg.run) else [num_workers]
    for world in sizes:
        error = empty_epoch_error(plan_batches(cfg, world), images, data_dir)
        if error is not None:
            raise error


class StorageError(ValueError):
    """run.storage cannot hold the run (read-only, full, not a directory): nothing was started."""


def check_storage_writable(storage: Path, run_dir: Path) -> None:
    """Write and remove a probe file in the run directory (in the storage when the run has none yet:
    a refused launch leaves no directory behind) before anything starts: a read-only or full storage
    otherwise surfaces as a worker's failed checkpoint, after the first steps."""
    where = run_dir if run_dir.is_dir() else storage
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = where / f".fr_train-write-probe-{os.getpid()}"
        probe.write_bytes(b"fr_train")
        probe.unlink()
    except OSError as exc:
        why = {errno.EROFS: "is read-only", errno.ENOSPC: "is full", errno.EDQUOT: "is over its quota",
               errno.EACCES: "is not writable by this user", errno.ENOTDIR: "is not a directory",
               errno.EEXIST: "is not a directory"}.get(
            exc.errno or 0, f"cannot be written ({exc.strerror or exc})")
        raise StorageError(f"run.storage={storage}: {where} {why} ({type(exc).__name__}: {exc}). Pass --storage "
                           "a directory this user can write on every node, with room for the checkpoints") from None


def launch(cfg: TrainConfig) -> int:
    """Run ``cfg`` to its end under Ray Train; the exit code (0 done, 1 failed, 128+N on signal N)."""
    from cluster.run_owner import claim_run

    setup_console()
    cfg.run.name = resolve_run_name(cfg)
    storage = Path(cfg.run.storage).expanduser().resolve()
    cfg.run.storage = str(storage)
    run_dir = storage / cfg.run.name
    check_storage_writable(storage, run_dir)
    new_dir = not run_dir.exists()
    # One launch at a time owns the run directory (a second is refused naming the owner, before it
    # reads or writes anything there); the record of a launch that is gone is taken over.
    ownership = claim_run(run_dir)
    try:
        if ownership.took_over is not None:
            log.info(f"run {cfg.run.name}: its previous launch ({ownership.took_over.describe()}) is gone; "
                     "this launch owns the run directory now")
        return _launch_owned(cfg, storage, run_dir)
    finally:
        ownership.release()
        if new_dir:  # a launch refused before it wrote anything leaves no directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def _launch_owned(cfg: TrainConfig, storage: Path, run_dir: Path) -> int:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.driver_stop import fit_until_signal, force_exit
    from cluster.failures import read_fatal
    from cluster.local_cluster import LocalTorchConfig, start_local_ray
    from cluster.outcome import (
        ATTEMPTS_NAME,
        AttemptCounter,
        failed_attempts,
        failure_line,
        resume_point,
        run_finished,
        summarize_run,
    )
    from cluster.ray_services import start_autoscaling_coordinator
    from cluster.ray_state import set_aside_ray_snapshot
    from cluster.run_owner import clear_launch_records
    from cluster.worker import train_loop
    from data_pipeline.dataset import open_dataset
    from fr_train.backbones import square_side
    from fr_train.checkpointing import check_run_directory

    # Before anything else: a run name owns its directory (resume it, --overwrite it, or another
    # --name); the checkpoint it would resume from is checked here, on the driver (manifests and
    # sizes: rank 0 hashes every file before loading, and a large head's checkpoint is GBs).
    start = check_run_directory(run_dir, cfg, hash_files=False)
    data_dir = prepare_data(cfg)
    cfg.data.path = str(data_dir)
    with open_dataset(data_dir) as dataset:  # what the backbone and a resumed head need of it
        check_image_size(dataset)
        square_side(dataset.image_size, dataset.property_path)
        check_resume_compatible(start, cfg, dataset.num_classes)
    if cfg.run.num_workers:
        check_batch_fits(cfg, cfg.run.num_workers, data_dir)

    # Inside `ray job submit` RAY_ADDRESS is set and this joins that cluster; otherwise it starts
    # a local one, every socket on loopback (cluster/local_cluster.py). The job's runtime env must
    # not be re-specified here (Ray rejects the merge).
    local = not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        if local:
            dashboard = start_local_ray(cfg.run.ray_log_level)
            log.info(f"local Ray cluster on this machine (loopback only), dashboard {dashboard}")
        else:
            ray.init(log_to_driver=True, logging_level=getattr(logging, cfg.run.ray_log_level))
    placement = choose_placement(cfg, ray.cluster_resources())
    check_placement(placement, cfg, local)
    if not cfg.run.num_workers:  # the size came from the cluster (else it was checked before Ray started)
        check_batch_fits(cfg, placement.num_workers, data_dir)
    elastic = is_elastic(cfg.run)
    clear_launch_records(run_dir)  # a new launch: the cause an earlier one ended on may be fixed
    aside = set_aside_ray_snapshot(run_dir)
    if aside is not None:
        log.info(f"set aside Ray Train's checkpoint list {aside.name} (fr_train resumes from its own checkpoints; "
                 "cluster/ray_state.py)")
    size = f"{cfg.run.min_workers} to {placement.num_workers} workers (elastic)" if elastic else \
        f"{placement.num_workers} worker(s)"
    # The resolved config goes to the run directory (rank 0 writes config.json), not the console:
    # ~130 lines there pushed the run's own lines off the screen; --print-config shows it first.
    log.info(f"run {cfg.run.name}: {size}, {'GPU' if placement.use_gpu else 'CPU'}, storage {storage}; "
             f"config {run_dir / 'config.json'}")

    start_autoscaling_coordinator()  # before any worker: Ray Train's first request finds it up
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=(LocalTorchConfig if local else TorchConfig)(backend="nccl" if placement.use_gpu else "gloo"),
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
            worker_runtime_env=_worker_env(local, placement.use_gpu),
            # fr_train prints one line per logged step; Ray's own per-report lines only when asked.
            logging_config=LoggingConfig(log_level=cfg.run.ray_log_level),
        ),
    )
    # In the run directory: Ray's controller may run on another node; the storage is shared by all.
    attempts_file = run_dir / ATTEMPTS_NAME
    trainer.run_config.callbacks = [AttemptCounter(attempts_file)]

    def on_force(signal_name: str) -> None:
        log.info(f"second {signal_name}: stopping at once; {resume_point(run_dir)} and repeats the steps since")
        force_exit(128 + int(signal.Signals[signal_name]))

    try:
        outcome = fit_until_signal(trainer.fit, run_dir, on_force=on_force)
    finally:
        if owns_ray:
            # Ray forwards the workers' output to this process asynchronously: disconnect first, so that
            # the run's last line below is the last line the user reads, not a late worker log line.
            ray.shutdown()
    attempts = failed_attempts(attempts_file)
    error = outcome.error if outcome.error is not None else getattr(outcome.result, "error", None)
    fatal = read_fatal(run_dir)
    if fatal is not None or error is not None or outcome.result is None:
        log.info(failure_line(cfg.run.name, run_dir, error, attempts, cfg.run.max_failures, fatal))
        return 1
    if outcome.signal_name is not None:
        if run_finished(run_dir):  # the signal came after the last step: the run is complete
            log.info(summarize_run(run_dir))
        else:
            log.info(f"run {cfg.run.name} stopped on {outcome.signal_name}: {resume_point(run_dir)}")
        return outcome.exit_code
    log.info(summarize_run(run_dir))
    return 0


def _worker_env(local: bool, use_gpu: bool) -> dict[str, object]:
    """Runtime env of the Ray Train workers: cluster.preemption.defer_sigterm runs in each worker
    process before Ray's main loop (Ray Train's worker_runtime_env does not export a setup hook by
    itself, only ray.init does, so it is exported the way ray.init does it); on a local cluster,
    gloo and NCCL bind the loopback interface. DeepSpeed is told the accelerator the placement chose
    (DS_ACCELERATOR) instead of guessing it, which warned "Setting accelerator to CPU" on every rank.
    Ray Train's print patch is off (RAY_TRAIN_ENABLE_PRINT_PATCH=0): it sends every ``print`` to the
    root logger, around any ``redirect_stdout``, so DeepSpeed's "... built successfully" reached the
    console once per rank although build_engine captures it; fr_train prints through its logger."""
    from ray._private.runtime_env.setup_hook import export_setup_func_module

    from cluster.local_cluster import LOOPBACK_SOCKET_ENV

    hook = "cluster.preemption.defer_sigterm"
    env = dict(export_setup_func_module({"worker_process_setup_hook": hook}, hook))
    env_vars = {**dict(env.get("env_vars") or {}), "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",  # type: ignore[arg-type]
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if local:
        env_vars.update(LOOPBACK_SOCKET_ENV)
    env["env_vars"] = env_vars
    return env
