"""A training process SIGKILLed anywhere loses nothing but the steps since its newest committed
checkpoint: 20 kill points drawn from a fixed seed, on the real Trainer (DALI on the synthetic
default, DeepSpeed, the sharded head, asynchronous checkpoints every 2 steps), each followed by a
restart with ``--resume auto``. The method is VPL with the compact head state (fp8 momentum and
memory bank rows with per-row scales, bf16 prototypes).

The kill points cover the whole life of a checkpoint: between two steps (the asynchronous write
of the step just saved may still be running in its thread: SIGKILL takes both), half-way through
a rank file, after every data file but before the manifest, after the manifest but before the
directory is renamed into place, and after the rename while older checkpoints are pruned. The
SIGKILL is real (the process kills itself at that point; a test hook places it, because a timer
could not hit a millisecond-long window reliably). After each kill every committed checkpoint on
disk verifies (sizes and sha256 against its manifest) and the next start resumes from the newest
of them; in the end every step's loss, from whichever life computed it, equals the uninterrupted
run's bitwise, and so does the final model.

Cost: ~21 short lives of one CPU process each, forked from a runner that imported torch,
DeepSpeed and DALI once (no torch operation runs in the runner before a fork)."""

from __future__ import annotations

import json
import os
import random
import signal
import traceback
from pathlib import Path
from typing import Any

import pytest

from fr_train.config import build_config

TOTAL_STEPS = 52  # 24 steps per epoch at batch 8: the run crosses two epoch boundaries
EVERY = 2
KILLS = 20
SEED = 2026
PHASES = ("between_steps", "in_rank_file", "before_manifest", "before_rename", "in_prune")


def kill_plan(seed: int = SEED, kills: int = KILLS) -> list[tuple[str, int]]:
    """(phase, step) for each life but the last, drawn so that every kill lies ahead of where its
    life can have resumed (the newest checkpoint before it is at most the previous kill's step).
    A write phase's step is the checkpoint (a multiple of EVERY) being written when the kill lands."""
    rng = random.Random(seed)
    plan: list[tuple[str, int]] = []
    floor = 0  # no life resumes past the previous kill point
    for _ in range(kills):
        phase = rng.choice(PHASES)
        # between steps: one or two steps on; a write: the first checkpoint after the floor
        step = floor + rng.randint(1, 2) if phase == "between_steps" else (floor // EVERY + 1) * EVERY
        plan.append((phase, step))
        floor = step
    assert floor < TOTAL_STEPS, "the plan must leave steps for the last life"
    return plan


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(phase: str, step: int) -> None:
    """Place the SIGKILL of this life (the process is a fork of the runner: patches stay here)."""
    from fr_train.checkpointing import files, manager
    from fr_train.train.trainer import Trainer

    def in_step_dir(path: Path) -> bool:
        return f"step_{step:09d}" in str(path)

    if phase == "between_steps":
        train_step = Trainer.train_step

        def step_then_die(self: Trainer, *args: Any, **kwargs: Any) -> float:
            if self.state.step == step:  # step `step` is done (and logged); the next one never starts
                _kill()
            return train_step(self, *args, **kwargs)

        Trainer.train_step = step_then_die  # type: ignore[method-assign]
    elif phase == "in_rank_file":
        def half_then_die(path: Path, obj: Any) -> files.FileEntry:
            if in_step_dir(path) and path.name.startswith("rank_"):
                import io

                import torch

                buf = io.BytesIO()
                torch.save(obj, buf)
                with path.open("wb") as f:  # half of the file reaches the disk, then the process dies
                    f.write(buf.getbuffer()[: buf.tell() // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _kill()
            return files.write_torch(path, obj)

        manager.write_torch = half_then_die  # type: ignore[assignment]
    elif phase in ("before_manifest", "before_rename"):
        def manifest_then_die(directory: Path, s: int, entries: dict[str, Any]) -> None:
            if s == step and phase == "before_manifest":
                _kill()
            files.write_manifest(directory, s, entries)
            if s == step:
                _kill()

        manager.write_manifest = manifest_then_die  # type: ignore[assignment]
    elif phase == "in_prune":
        prune = manager.CheckpointManager._prune

        def prune_and_die(self: Any, s: int) -> None:
            if s == step:
                _kill()
            prune(self, s)

        manager.CheckpointManager._prune = prune_and_die  # type: ignore[method-assign]
    else:
        raise ValueError(phase)


def _life(cfg_dict: dict[str, Any], kill: tuple[str, int] | None, error_file: Path) -> None:
    """One process life: a Trainer on one rank from --resume auto, killed where `kill` says."""
    try:
        import torch
        import torch.distributed as dist

        from fr_train.config import TrainConfig
        from fr_train.train.trainer import Trainer
        from tests.distributed import free_port

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
        if kill is not None:
            _arm(*kill)
        Trainer(TrainConfig.from_dict(cfg_dict), 0, 1, torch.device("cpu")).fit()
        dist.destroy_process_group()
    except BaseException:
        error_file.write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _committed(root: Path) -> dict[int, str]:
    """Every committed checkpoint (a step_* directory with a manifest) → "ok" or why it is corrupt."""
    from fr_train.checkpointing.files import MANIFEST, CorruptCheckpointError, verify_directory
    from fr_train.checkpointing.loading import committed_steps

    out: dict[int, str] = {}
    for step, path in committed_steps(root) if root.is_dir() else []:
        if (path / MANIFEST).is_file():
            try:
                verify_directory(path, hash_files=True)
                out[step] = "ok"
            except CorruptCheckpointError as e:
                out[step] = str(e)
    return out


def _runner(reference: dict[str, Any], killed: dict[str, Any], plan: list[tuple[str, int]], out: str) -> None:
    """Spawned once: imports the heavy modules, then forks each life and records what it left."""
    # Everything a life imports, imported once before the forks (a Trainer's build would otherwise
    # spend ~3 s importing DeepSpeed and torch._dynamo, which torch.optim pulls in lazily).
    import deepspeed  # noqa: F401
    import nvidia.dali.fn  # noqa: F401
    import torch._dynamo  # noqa: F401

    import fr_train.checkpointing
    import fr_train.heads
    import fr_train.train.trainer  # noqa: F401

    def start(cfg: dict[str, Any], kill: tuple[str, int] | None, name: str) -> tuple[int, Path]:
        error_file = Path(out).with_suffix(f".err-{name}")
        error_file.unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:
            _life(cfg, kill, error_file)
        return pid, error_file

    def outcome(pid: int, error_file: Path) -> tuple[str, str]:
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return f"signal {os.WTERMSIG(status)}", ""
        return f"exit {os.WEXITSTATUS(status)}", error_file.read_text() if error_file.exists() else ""

    def live(cfg: dict[str, Any], kill: tuple[str, int] | None) -> tuple[str, str]:
        return outcome(*start(cfg, kill, "life"))

    # The uninterrupted reference trains beside the lives (one thread each, two cores).
    straight = start(reference, None, "reference")
    result: dict[str, Any] = {"lives": []}
    root = Path(killed["run"]["storage"]) / killed["run"]["name"] / "checkpoints"
    for kill in [*plan, None]:
        status, error = live(killed, kill)
        result["lives"].append({"kill": kill, "status": status, "error": error, "committed": _committed(root),
                                "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith("."))
                                if root.is_dir() else []})
        if error:
            break
    result["reference"] = outcome(*straight)
    Path(out).write_text(json.dumps(result))


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_at_20_points_resumes_bitwise_from_the_newest_committed_checkpoint(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    import multiprocessing as mp

    import torch
    from safetensors.torch import load_file

    from cluster.launch import prepare_data
    from fr_train.checkpointing.loading import load_checkpoint
    from tests.test_gpu_configuration_on_cpu import TINY

    plan = kill_plan()
    assert {phase for phase, _ in plan} == set(PHASES)  # the seed covers every kind of kill point

    def config(name: str) -> dict[str, Any]:
        # VPL in the compact head state (bf16 prototypes, fp8 momentum and memory rows with per-row
        # scales): the state whose resume has the most parts to get exactly right.
        cfg = build_config("mbf", "vpl", overrides=[
            "head.storage_dtype=bfloat16", "head.momentum_dtype=float8_e4m3fn", "head.vpl_memory_dtype=float8_e4m3fn",
            "head.vpl_start_iter=4",
            f"data.cache_dir={tmp_path_factory.mktemp('kill_cache')}", *TINY, f"run.storage={tmp_path}",
            f"run.name={name}", "data.batch_size=8", f"schedule.max_steps={TOTAL_STEPS}",
            f"checkpoint.every_steps={EVERY}", "checkpoint.every_minutes=0", "checkpoint.keep=2",
            "checkpoint.resume=auto", "eval.enabled=false", "run.export_onnx=false", "run.log_every=1"])
        cfg.data.path = str(prepare_data(cfg))
        return cfg.to_dict()

    out = tmp_path / "result.json"
    proc = mp.get_context("spawn").Process(target=_runner, args=(config("straight"), config("killed"), plan,
                                                                 str(out)))
    proc.start()
    proc.join(timeout=900)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the kill-point runner hung")
    result = json.loads(out.read_text())
    assert result["reference"] == ["exit 0", ""], result["reference"][1]
    lives = result["lives"]
    assert [life["status"] for life in lives] == ["signal 9"] * KILLS + ["exit 0"], lives[-1]["error"]

    reference = {r["step"]: r["loss"] for r in _events(tmp_path / "straight") if r["event"] == "train"}
    events = _events(tmp_path / "killed")
    starts = [r for r in events if r["event"] == "start"]
    assert len(starts) == KILLS + 1
    matrix = []
    for i, (life, start) in enumerate(zip(lives[:-1], starts[1:], strict=True)):
        committed = {int(k): v for k, v in life["committed"].items()}
        assert all(v == "ok" for v in committed.values()), (life["kill"], committed)  # none is corrupt
        newest = max(committed, default=0)
        assert start["step"] == newest, (i, life["kill"], start["step"], newest)  # resumed from the newest
        matrix.append(f"{life['kill'][0]:16s} at step {life['kill'][1]:2d} -> resumed at step {newest:2d}")
    # Every step, whichever life computed it (some twice), has the uninterrupted run's loss, bitwise.
    train = [(r["step"], r["loss"]) for r in events if r["event"] == "train"]
    assert {s for s, _ in train} == set(reference) == set(range(1, TOTAL_STEPS + 1))
    assert all(loss == reference[step] for step, loss in train), \
        [(s, loss, reference[s]) for s, loss in train if loss != reference[s]][:5]
    final, straight = (load_file(str(tmp_path / n / "final" / "backbone.safetensors")) for n in ("killed", "straight"))
    assert final.keys() == straight.keys() and all(torch.equal(final[k], straight[k]) for k in final)
    # Nothing a kill left behind outlives the run: interrupted writes are pruned, two checkpoints kept.
    assert lives[-1]["leftovers"] == [] and sorted(lives[-1]["committed"]) == [str(TOTAL_STEPS - EVERY),
                                                                              str(TOTAL_STEPS)]
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / f"step_{TOTAL_STEPS:09d}").step == TOTAL_STEPS
    print("\n" + "\n".join(matrix))
