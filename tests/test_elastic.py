"""Elastic runs: between run.min_workers and run.num_workers workers, the same global batch at every
size, the same images in every step, resumed from the newest checkpoint after each resize; on a real
local Ray cluster whose nodes leave and come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.test_train_e2e import SYNTH


def _cfg(*overrides: str, method: str = "arcface") -> Any:
    from fr_train.config import build_config

    return build_config("mbf", method, overrides=list(overrides))


@pytest.mark.parametrize(("global_batch", "world", "max_micro", "plan"), [
    (24, 3, 8, (8, 1)),  # the full size: the configured micro-batch, no accumulation
    (24, 2, 8, (6, 2)),  # 12 per worker do not fit 8: two micro-batches of 6
    (24, 1, 8, (8, 3)),
    (36, 2, 8, (6, 3)),  # 18 per worker: 9 > 8, so three of 6
    (7, 1, 4, (1, 7)),  # a prime: only single images fit
])
def test_the_global_batch_is_cut_into_the_fewest_micro_batches_that_fit(
        global_batch: int, world: int, max_micro: int, plan: tuple[int, int]) -> None:
    from fr_train.train.batch_plan import split_global_batch

    p = split_global_batch(global_batch, world, max_micro)
    assert (p.micro_batch, p.grad_accum) == plan
    assert p.global_batch == global_batch


def test_a_fixed_size_run_keeps_its_configured_batch_at_any_world_size() -> None:
    from fr_train.train.batch_plan import plan_batches

    cfg = _cfg("data.batch_size=16", "run.grad_accum=2", "run.num_workers=4")
    assert [(p.micro_batch, p.grad_accum, p.global_batch) for p in (plan_batches(cfg, w) for w in (1, 2, 4))] == \
        [(16, 2, 32), (16, 2, 64), (16, 2, 128)]
    # elastic: the global batch of the full size, 12 × 4 × 2 = 96, at every size
    elastic = _cfg("data.batch_size=12", "run.grad_accum=2", "run.num_workers=4", "run.min_workers=2",
                   "data.sampler=global")
    assert [(p.micro_batch, p.grad_accum, p.global_batch) for p in (plan_batches(elastic, w) for w in (4, 3, 2))] == \
        [(12, 2, 96), (8, 4, 96), (12, 4, 96)]
    with pytest.raises(ValueError, match="elastic run of 2 to 4 workers was started on 1"):
        plan_batches(elastic, 1)


@pytest.mark.parametrize(("overrides", "message"), [
    (["run.min_workers=2"], "needs an explicit run.num_workers"),
    (["run.num_workers=2", "run.min_workers=3", "data.sampler=global"], "must be <= run.num_workers"),
    (["run.num_workers=3", "run.min_workers=1"], "data.sampler: must be global or pk"),
    (["run.num_workers=4", "run.min_workers=3", "data.sampler=global", "data.batch_size=16"],
     "does not split evenly over 3 worker(s); it must be a multiple of 12 (e.g. 60 or 72)"),
    (["run.min_workers=-1"], "run.min_workers: must be >= 0"),
])
def test_an_elastic_range_that_cannot_keep_its_global_batch_is_refused(overrides: list[str], message: str) -> None:
    from fr_train.config import ConfigError

    with pytest.raises(ConfigError, match=r"^(run\.min_workers|data\.sampler):") as err:
        _cfg(*overrides)
    assert message in str(err.value)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nvidia.dali")
    from data_pipeline.dali import prepare_dali_index
    from data_pipeline.pack import write_insightface_dataset
    from tests.test_dali import NUM_CLASSES, SIZE, samples

    out = write_insightface_dataset(tmp_path_factory.mktemp("elastic"), samples(seed=4), NUM_CLASSES, (SIZE, SIZE))
    prepare_dali_index(out)
    return out


def _steps(dataset_dir: Path, world: int, micro: int, global_batch: int, steps: int, sampler: str,
           state: dict | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Per optimizer step: the images and labels of all ranks and micro-batches, sorted by record key
    (the order inside a step is the split's business; the set of images is the schedule's)."""
    from data_pipeline.dali import DaliConfig
    from data_pipeline.pk_sampler import PKFaceIterator
    from data_pipeline.scheduled import ScheduledFaceIterator

    cfg = DaliConfig(batch_size=global_batch // world // micro, last_batch="drop", num_threads=1, seed=7)
    if sampler == "pk":
        its = [PKFaceIterator(dataset_dir, cfg, k=4, rank=r, world_size=world, micro_batches=micro)
               for r in range(world)]
    else:
        its = [ScheduledFaceIterator(dataset_dir, cfg, rank=r, world_size=world, micro_batches=micro)
               for r in range(world)]
    if state is not None:
        for it in its:
            it.load_state_dict(state)
    def next_batch(it: Any) -> Any:
        try:
            return next(it)
        except StopIteration:  # the epoch ended: the Trainer resets and goes on
            it.reset()
            return next(it)

    images, labels = [], []
    for _ in range(steps):
        batches = [next_batch(it) for it in its for _ in range(micro)]
        keys = torch.cat([b.keys for b in batches])
        order = torch.argsort(keys)
        assert len(set(keys.tolist())) == len(keys)  # no image twice in a step
        images.append(torch.cat([b.images for b in batches])[order])
        labels.append(torch.cat([b.labels for b in batches])[order])
    return images, labels, its[0].state_dict()


@pytest.mark.parametrize("sampler", ["global", "pk"])
def test_every_split_of_the_global_batch_reads_the_same_images_in_each_step(dataset_dir: Path, sampler: str) -> None:
    """One optimizer step holds the same 24 images (flips included) whether 3 workers read 8 each,
    2 workers two micro-batches of 6, or 1 worker three of 8; a position saved at one split resumes
    at another; steps cross the epoch boundary."""
    full_images, full_labels, state = _steps(dataset_dir, 3, 1, 24, 6, sampler)
    assert state["epoch"] >= 1  # the six steps crossed an epoch boundary (101 images: 4 global steps of 24)
    for world, micro in ((2, 2), (1, 3)):
        images, labels, _ = _steps(dataset_dir, world, micro, 24, 6, sampler)
        for step in range(6):
            assert torch.equal(labels[step], full_labels[step]) and torch.equal(images[step], full_images[step])
    _, _, state = _steps(dataset_dir, 3, 1, 24, 2, sampler)  # stopped after 2 steps at W=3 ...
    images, labels, _ = _steps(dataset_dir, 1, 3, 24, 4, sampler, state)  # ... resumed at W=1
    for step in range(4):
        assert torch.equal(images[step], full_images[2 + step]) and torch.equal(labels[step], full_labels[2 + step])


def _dali(batch: int) -> Any:
    from data_pipeline.dali import DaliConfig

    return DaliConfig(batch_size=batch, last_batch="drop", num_threads=1, seed=7)


def test_a_position_from_another_global_batch_is_refused(dataset_dir: Path) -> None:
    from data_pipeline.scheduled import ScheduledFaceIterator

    _, _, state = _steps(dataset_dir, 2, 1, 24, 1, "global")
    other = ScheduledFaceIterator(dataset_dir, _dali(8), rank=0, world_size=2)
    with pytest.raises(ValueError, match="global_batch: saved 24 vs now 16"):
        other.load_state_dict(state)


def _elastic_config(cache: Path, storage: Path, name: str, steps: int) -> Any:
    """mbf CosFace at 32x32, elastic 1 to 3 workers with a global batch of 24, the settings under
    which a step is the same computation at every split: all prototypes (sample_rate 1) and
    BatchNorm on running statistics (module docstring of fr_train/train/batch_plan.py)."""
    from cluster.launch import prepare_data

    cfg = _cfg(f"data.cache_dir={cache}", *SYNTH, "data.synthetic.image_size=32", "data.synthetic.num_pairs=100",
               f"run.storage={storage}",
               f"run.name={name}",
               "data.batch_size=8", "run.num_workers=3", "run.min_workers=1", "data.sampler=global",
               "backbone.freeze_bn=true", "head.sample_rate=1", "head.s=16", "optimizer.lr=0.002",
               "optimizer.base_batch=24", "optimizer.clip_grad_norm=0", f"schedule.max_steps={steps}",
               "run.log_every=1", "eval.enabled=false", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
               "run.export_onnx=false", method="cosface")  # ONNX: tests/test_export.py and the learning test
    cfg.data.path = str(prepare_data(cfg))
    return cfg


def _fit(rank: int, world: int, cfg_dict: dict, stop_after: int) -> list[tuple[int, float, int, int]]:
    from tests.test_resume import fit_stopping_after

    trainer = fit_stopping_after(rank, world, cfg_dict, stop_after)
    return [(h["step"], h["loss"], trainer.plan.micro_batch, trainer.plan.grad_accum) for h in trainer.state.history]


@pytest.mark.slow
def test_a_run_resized_from_one_to_three_to_two_workers_follows_the_uninterrupted_loss_curve(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Steps 1-3 at W=1 (three micro-batches of 8), 4-6 at W=3 (8 images each), 7-9 at W=2 (two
    micro-batches of 6), each start resuming the previous one's checkpoint with ZeRO 2 (the head, its
    optimizer rows and the backbone's optimizer slices re-split up and down): the losses are those of
    one uninterrupted W=1 run to float tolerance (the steps differ only in summation order), and the
    same number on every rank. (Also the data-parallel contract over several steps: DeepSpeed's SGD on
    the backbone, the head's row-sparse SGD and the LR schedule give W=3 and W=2 the curve of W=1.)"""
    cache = tmp_path_factory.mktemp("elastic_cache")
    straight_cfg = _elastic_config(cache, tmp_path, "straight", 9)
    straight = run_distributed(_fit, 1, straight_cfg.to_dict(), 0, timeout=600)[0]
    cfg = _elastic_config(cache, tmp_path, "elastic", 9)
    cfg.run.zero_stage = 2
    parts = []
    for world, stop in ((1, 3), (3, 6), (2, 0)):
        out = run_distributed(_fit, world, cfg.to_dict(), stop, timeout=600)
        assert all(o == out[0] for o in out)  # the same losses on every rank
        parts += out[0]
    assert [(s, m, a) for s, _, m, a in parts] == [(1, 8, 3), (2, 8, 3), (3, 8, 3), (4, 8, 1), (5, 8, 1), (6, 8, 1),
                                                  (7, 6, 2), (8, 6, 2), (9, 6, 2)]
    assert [s for s, *_ in straight] == list(range(1, 10))
    losses, reference = np.array([loss for _, loss, *_ in parts]), np.array([loss for _, loss, *_ in straight])
    print(f"\nelastic  {np.round(losses, 5).tolist()}\nstraight {np.round(reference, 5).tolist()}\nlargest relative "
          f"difference {np.max(np.abs(losses / reference - 1)):.1e}")
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    assert len(set(reference.tolist())) == len(reference)  # every step changed the model


def _kill_node(node_manager_port: int) -> int:
    """SIGKILL one Ray node of this machine at once, as a lost VM: its raylet and every process under
    it (the Ray Train worker it hosts, its agents). Returns how many processes were killed."""
    import psutil

    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if "raylet" in (proc.info["name"] or "") and \
                    f"--node_manager_port={node_manager_port}" in " ".join(proc.info["cmdline"] or []):
                victims = [proc, *proc.children(recursive=True)]
                for v in victims:
                    v.kill()
                return len(victims)
        except psutil.Error:
            continue
    raise AssertionError(f"no raylet with node manager port {node_manager_port} is running")


@pytest.mark.slow
def test_an_elastic_run_shrinks_as_nodes_are_lost_and_grows_back_when_they_return(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A real local Ray cluster: a head without CPUs (driver and Ray Train's controller) and three
    one-CPU worker nodes, all on 127.0.0.1. `fr_train --num-workers 3 --min-workers 1` starts on 3;
    two nodes are SIGKILLed → the run goes on at W=1 from its newest checkpoint (the 3 → 2 → 1 split
    numerics are the in-process test's); two new nodes join → it grows back to W=3 at the next
    resize check. The whole run's losses equal an
    uninterrupted run's (W=1, the same global batch of 24) to float tolerance, a step trained again
    after a resize gets the same loss, no step is lost, and the final model is the uninterrupted
    one's. Prints the measured resize times."""
    import json
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    from tests.distributed import free_port
    from tests.test_resume import _ray_train_workers
    from tests.test_train_e2e import _env

    bin_dir = Path(sys.executable).parent
    cache, storage = tmp_path_factory.mktemp("elastic_ray_cache"), tmp_path / "runs"
    total = 12
    cfg = _elastic_config(cache, storage, "elastic", total)
    env = {**_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # A lost node is declared dead after ~5 s instead of Ray's default ~30 s (GCS health checks;
           # the first after 5 s: a node starting on this busy machine must not be declared dead).
           "RAY_health_check_initial_delay_ms": "5000", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "5",
           # Ray Train's elastic policy sees the cluster through a view refreshed every 20 s: right after a
           # node is lost it may try the old size first, until this timeout (default 60 s) ends the try.
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "8"}
    temp_dir = Path(tempfile.mkdtemp(prefix="rayel", dir="/tmp"))  # short: socket paths are length-limited
    address = f"127.0.0.1:{free_port()}"
    cli_log = (tmp_path / "ray_cli.log").open("a")

    def ray_start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([str(bin_dir / "ray"), "start", *args], env=env, stdout=cli_log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def add_nodes(n: int) -> list[int]:
        ports = [free_port() for _ in range(n)]
        for port in ports:  # one at a time: nodes starting together on one machine time out registering
            rc = ray_start("--address", address, "--num-cpus", "1", "--num-gpus", "0", "--node-manager-port",
                           str(port)).wait(timeout=180)
            assert rc == 0, (tmp_path / "ray_cli.log").read_text()[-3000:]
        return ports

    assert ray_start("--head", "--port", address.split(":")[1], "--node-ip-address", "127.0.0.1", "--num-cpus", "0",
                     "--num-gpus", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
                     "--temp-dir", str(temp_dir), "--disable-usage-stats").wait(timeout=180) == 0
    nodes = add_nodes(3)
    log = storage / "elastic" / "train_log.jsonl"
    overrides = [arg for key in ("data.cache_dir", "data.path", "data.batch_size", "data.sampler", "backbone.freeze_bn",
                                 "head.sample_rate", "head.s", "optimizer.lr",
                                 "optimizer.base_batch", "optimizer.clip_grad_norm", "eval.every_steps",
                                 "run.export_onnx")
                 for arg in ("--set", f"{key}={_get(cfg, key)}")]
    cmd = [str(bin_dir / "fr_train"), "mbf", "cosface", "--name", "elastic", "--storage", str(storage),
           "--num-workers", "3", "--min-workers", "1", "--max-steps", str(total), *overrides,
           "--set", "run.log_every=1", "--set", "checkpoint.every_steps=2", "--set", "checkpoint.every_minutes=0",
           "--set", "run.resize_interval_s=2", "--set", "run.max_failures=10",
           "--set", "run.ray_log_level=INFO"]  # the test watches for Ray Train's resize decision
    # The uninterrupted reference (one process, the same global batch) trains meanwhile: the elastic run
    # spends most of its time waiting for Ray to notice lost and returning nodes.
    straight_cfg = _elastic_config(cache, tmp_path / "straight", "straight", total)
    straight_cfg.eval.enabled, straight_cfg.eval.every_steps = True, 0
    straight: list[Any] = []

    def run_reference() -> None:
        try:
            straight.append(run_distributed(_fit, 1, straight_cfg.to_dict(), 0, timeout=900)[0])
        except BaseException as exc:  # re-raised in the test's thread
            straight.append(exc)

    ref_thread = threading.Thread(target=run_reference, daemon=True)
    ref_thread.start()
    driver_log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": address}, stdout=driver_log, stderr=subprocess.STDOUT)
    events: dict[str, float] = {}
    paused: list[int] = []

    def driver_out() -> str:
        return (tmp_path / "driver.log").read_text(errors="replace")

    def records() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    try:
        deadline = time.time() + 900
        phase = 0
        while time.time() < deadline and proc.poll() is None and phase < 4:
            recs = records()
            starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
            world = recs[starts[-1]]["world_size"] if starts else 0
            trained = sum(1 for r in recs[starts[-1]:] if r.get("event") == "train") if starts else 0
            now = time.time()
            if phase == 0 and world == 3 and trained >= 3:
                # Two nodes lost at once (a spot zone reclaimed): Ray may first restart at 2 workers, from
                # the view it has of the cluster, before it sees both gone; the run ends up on one.
                _kill_node(nodes[0])
                _kill_node(nodes[1])
                events["lost 2"], phase = now, 2
            elif phase == 2 and world == 1 and trained >= 1:
                events.setdefault("training at W=1", now)
                if trained >= 2:
                    # Paused (SIGSTOP) while the nodes come back, so that the run is still mid-way when Ray
                    # decides to grow it, however fast this machine trains; resumed (SIGCONT) at that decision,
                    # so that Ray's resize finds it running and stops it as it would any worker.
                    paused = _ray_train_workers(temp_dir)
                    for pid in paused:
                        os.kill(pid, signal.SIGSTOP)
                    events["nodes back"], phase = time.time(), 3
                    add_nodes(2)
                    events["nodes up"] = time.time()
            elif phase == 3 and paused and ("resize the worker group from 1 -> " in driver_out()
                                            or now > events["nodes up"] + 45):
                for pid in paused:
                    os.kill(pid, signal.SIGCONT)
                events["grow decided"], paused = now, []
            elif phase == 3 and world == 3 and trained >= 1:
                events["training at W=3"], phase = now, 4
            time.sleep(0.2)
        proc.wait(timeout=600)
    finally:
        driver_log.close()
        if proc.poll() is None:
            proc.kill()
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        cli_log.close()
    out = (tmp_path / "driver.log").read_text()
    assert phase == 4 and proc.returncode == 0, (phase, events, out[-6000:])
    shrink = events["training at W=1"] - events["lost 2"]
    grow = events["training at W=3"] - events["nodes up"]
    print(f"\nresize times on this machine: two nodes lost -> training at W=1 {shrink:.1f} s; "
          f"two nodes back (`ray start` done) -> training at W=3 {grow:.1f} s, of which "
          f"{events['grow decided'] - events['nodes up']:.1f} s until Ray Train decided to grow")

    recs = records()
    worlds = [r["world_size"] for r in recs if r.get("event") == "start"]
    low = worlds.index(1)  # shrunk to one worker (through two, if Ray restarted before it saw both nodes gone)
    assert worlds[0] == 3 and worlds[:low + 1] in ([3, 1], [3, 2, 1]) and worlds[-1] == 3, worlds
    assert worlds[low:] == sorted(worlds[low:]), worlds  # then only grows
    assert "elastic run resized: 3 -> 1 workers" in out or "elastic run resized: 2 -> 1 workers" in out
    train = [(r["step"], r["loss"]) for r in recs if r.get("event") == "train"]
    # after every start: consecutive steps from the checkpoint it resumed, to the next start or the end
    first: dict[int, float] = {}
    for step, loss in train:
        if step in first:  # trained again after a resize, on the same images at another split
            np.testing.assert_allclose(loss, first[step], rtol=1e-4)
        first.setdefault(step, loss)
    assert sorted(first) == list(range(1, total + 1))  # no step lost
    ref_thread.join(timeout=900)
    assert straight, "the uninterrupted reference run did not finish"
    if isinstance(straight[0], BaseException):
        raise straight[0]
    elastic_losses = np.array([first[s] for s in range(1, total + 1)])
    straight_losses = np.array([loss for _, loss, *_ in straight[0]])
    print(f"largest relative loss difference to the uninterrupted run: "
          f"{np.max(np.abs(elastic_losses / straight_losses - 1)):.1e}")
    np.testing.assert_allclose(elastic_losses, straight_losses, rtol=1e-4)
    # The final models: the same weights to float tolerance, the same verification result.
    from safetensors.torch import load_file

    mine = load_file(storage / "elastic" / "final" / "backbone.safetensors")
    theirs = load_file(tmp_path / "straight" / "straight" / "final" / "backbone.safetensors")
    assert mine.keys() == theirs.keys()
    for key in mine:
        scale = float(theirs[key].abs().max()) or 1.0
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-3, atol=1e-4 * scale, msg=key)
    end = next(r for r in recs if r.get("event") == "end")
    straight_end = next(r for r in _read(tmp_path / "straight" / "straight") if r.get("event") == "end")
    assert abs(end["eval"]["synth_val"]["accuracy"] - straight_end["eval"]["synth_val"]["accuracy"]) <= 0.01


def _get(cfg: Any, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return str(value).lower() if isinstance(value, bool) else value


def _read(run_dir: Path) -> list[dict]:
    from fr_train.train.records import read_events

    return read_events(run_dir)
