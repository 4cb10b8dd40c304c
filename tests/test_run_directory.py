"""A run name owns its directory, and a resume never destroys (issue 14).

Two defects lost whole runs without a word: with every checkpoint damaged, ``--resume auto`` logged
"falling back to an older one" (there was none), trained from step 0, moved the damaged checkpoints to
``abandoned_*`` and overwrote ``step_2``; and a second run with the same ``--name`` and ``--resume
never`` replaced the first run's model, config and checkpoints. These tests hold the rules of
fr_train/checkpointing/rundir.py on real checkpoint files (CheckpointManager writes them) and on the
real Trainer, whose refusal comes before it builds or writes anything: the file hashes of the run
directory are the same before and after every refusal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fr_train.checkpointing import (
    CheckpointManager,
    RunDirectoryError,
    check_run_directory,
    claim_run_directory,
    load_checkpoint,
)
from fr_train.checkpointing.rundir import LAUNCH_FILE
from fr_train.command_line import build_parser, config_from_args
from fr_train.config import ConfigError, TrainConfig, build_config


def _meta() -> dict[str, Any]:
    return {"epoch": 0, "samples_seen": 0, "num_classes": 4, "config": TrainConfig().to_dict()}


def _save(root: Path, *steps: int, keep: int = 5) -> CheckpointManager:
    """Real checkpoints of ``steps`` (one attempt, one session), each with its own backbone values."""
    mgr = CheckpointManager(root, keep=keep, rank=0, world=1)
    for step in steps:
        payload = {"train": {"step": step, "epoch": 0, "samples_seen": step}, "head": None, "data": None, "rng": None}
        mgr.save(step, payload, {"backbone": {"w": torch.full((64,), float(step))}}, _meta())
    return mgr


def _bitflip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _hashes(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by relative path: what "nothing was moved, changed or deleted" means."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _cfg(storage: Path, name: str = "r1", *extra: str) -> TrainConfig:
    return build_config("mbf", "arcface", overrides=[f"run.storage={storage}", f"run.name={name}", *extra])


def _finished_run(storage: Path, name: str = "r1") -> Path:
    """A run directory as a finished run leaves it: checkpoints, final/ model, config, log."""
    run = storage / name
    _save(run / "checkpoints", 2, 4)
    (run / "final").mkdir()
    (run / "final" / "backbone.safetensors").write_bytes(b"the first run's model")
    (run / "config.json").write_text('{"run": "first"}')
    (run / "train_log.jsonl").write_text('{"event": "start"}\n{"event": "end", "step": 4}\n')
    return run


def _new_trainer(cfg: TrainConfig) -> Any:
    """The real Trainer at rank 0 of 1 on CPU: it checks the run directory before it builds anything."""
    from fr_train.train.trainer import Trainer

    return Trainer(cfg, 0, 1, torch.device("cpu"))


# Every checkpoint damaged ------------------------------------------------------------------------

def test_auto_refuses_when_no_checkpoint_loads_listing_each_and_touches_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = _finished_run(tmp_path)
    _save(run / "checkpoints", 6)
    for step in (2, 4, 6):
        _bitflip(run / "checkpoints" / f"step_{step:09d}" / "backbone.pt")
    before = _hashes(run)
    with caplog.at_level(logging.WARNING, logger="fr_train.checkpoint"), \
            pytest.raises(RunDirectoryError) as info:
        _new_trainer(_cfg(tmp_path))
    message = str(info.value)
    assert message.startswith(f"run directory {run}: none of its 3 checkpoint(s)")
    lines = message.splitlines()
    for step in (6, 4, 2):  # one line per checkpoint, newest first, naming the file and the problem
        assert any(line.strip().startswith(f"step_{step:09d}: ") and f"step_{step:09d}/backbone.pt: sha256" in line
                   for line in lines), message
    assert f"finished model {run / 'final'}" in message
    assert "--resume never --overwrite" in message and "another --name" in message and "--resume PATH" in message
    assert "nothing was moved or deleted" in message
    assert _hashes(run) == before  # nothing moved, overwritten or written (not even config.json)
    assert "older" not in caplog.text and caplog.text.count("no checkpoint under") == 3


def _refused_start(rank: int, world: int, cfg_dict: dict[str, Any]) -> str:
    from fr_train.train.trainer import Trainer

    try:
        Trainer(TrainConfig.from_dict(cfg_dict), rank, world, torch.device("cpu"))
    except RunDirectoryError as e:
        return str(e)
    return "started"


def test_every_rank_refuses_together_instead_of_waiting_for_rank_0(tmp_path: Path) -> None:
    """Only rank 0 reads the run directory; its refusal reaches the other ranks before the build's
    first collective, so no rank is left waiting in deepspeed.initialize (a hang until the timeout)."""
    from tests.distributed import run_distributed

    run = _finished_run(tmp_path)
    before = _hashes(run)
    refused = run_distributed(_refused_start, 2, _cfg(tmp_path, "r1", "checkpoint.resume=never").to_dict(), timeout=120)
    assert refused[0].startswith(f"run directory {run} already holds a run")
    assert refused[1] == f"rank 1: rank 0 could not start the run: RunDirectoryError: {refused[0]}"
    assert _hashes(run) == before


def test_auto_refuses_final_without_a_checkpoint_to_continue(tmp_path: Path) -> None:
    """A finished run whose checkpoints were removed: auto has nothing to continue and would
    replace the model by a run from step 0."""
    run = _finished_run(tmp_path)
    for step in (2, 4):
        for f in (run / "checkpoints" / f"step_{step:09d}").iterdir():
            f.unlink()
        (run / "checkpoints" / f"step_{step:09d}").rmdir()
    before = _hashes(run)
    with pytest.raises(RunDirectoryError, match=rf"run directory {run} holds the finished model {run / 'final'} but "
                                                r"no checkpoint to continue from.*--overwrite"):
        _new_trainer(_cfg(tmp_path))
    assert _hashes(run) == before


# A damaged newest checkpoint with a good older one -----------------------------------------------

def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one_and_is_set_aside_never_overwritten(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "r1"
    root = run / "checkpoints"
    _save(root, 2, 4)
    _bitflip(root / "step_000000004" / "backbone.pt")
    damaged = _hashes(root / "step_000000004")
    with caplog.at_level(logging.WARNING, logger="fr_train.checkpoint"):
        start = check_run_directory(run, _cfg(tmp_path))
    assert start.resume_from is not None and start.resume_from.step == 2 and start.resume_path == str(
        root / "step_000000002")
    assert (f"checkpoint step 4 skipped (cannot be loaded): {root}/step_000000004/backbone.pt: sha256" in caplog.text
            and "the newest loadable checkpoint is the older step 2" in caplog.text
            and f"{root}/step_000000004 is left in place" in caplog.text and f"moved to {root}/set_aside" in caplog.text)
    assert _hashes(root / "step_000000004") == damaged  # the check reads only

    # The continued run (a new attempt) commits steps 3 and 4: the damaged step 4 moves aside, whole,
    # before the first commit, and the new step 4 never replaces it.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fr_train.checkpoint"):
        _save(root, 3, 4, keep=2)
    assert _hashes(root / "set_aside" / "step_000000004") == damaged
    assert f"{root}/step_000000004 is not on this run's timeline" in caplog.text
    assert f"moved to {root}/set_aside/step_000000004" in caplog.text and "never deletes it" in caplog.text
    assert load_checkpoint(root / "step_000000004").step == 4
    assert sorted(p.name for p in root.iterdir()) == ["set_aside", "step_000000003", "step_000000004"]

    # Damaged again later: set aside under another name, the first one untouched; the next start says
    # what is kept there and how big it is.
    _bitflip(root / "step_000000004" / "rank_0.pt")
    _save(root, 4)
    aside = sorted(p.name for p in (root / "set_aside").iterdir())
    assert aside[0] == "step_000000004" and aside[1].startswith("step_000000004-") and len(aside) == 2
    assert _hashes(root / "set_aside" / "step_000000004") == damaged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fr_train.checkpoint"):
        claim_run_directory(check_run_directory(run, _cfg(tmp_path)), None)
    assert "2 checkpoint(s) set aside by earlier starts of this run" in caplog.text
    assert "fr_train never deletes them" in caplog.text


def test_the_drivers_early_check_reads_sizes_and_leaves_the_hashing_to_rank_0(tmp_path: Path) -> None:
    """The driver checks a run directory before Ray starts, and rank 0 checks it again (hashing every
    file) before loading: the driver's check reads manifests and sizes only, so a multi-GB checkpoint
    is hashed once per launch. A same-size corruption passes the driver and is caught by rank 0."""
    run = _finished_run(tmp_path)
    _bitflip(run / "checkpoints" / "step_000000004" / "backbone.pt")
    driver = check_run_directory(run, _cfg(tmp_path, "r1", "checkpoint.resume=auto"), hash_files=False)
    assert driver.resume_path == str(run / "checkpoints" / "step_000000004")
    rank0 = check_run_directory(run, _cfg(tmp_path, "r1", "checkpoint.resume=auto"))
    assert rank0.resume_path == str(run / "checkpoints" / "step_000000002")


def test_checkpoints_newer_than_an_explicit_older_resume_are_set_aside_not_deleted(tmp_path: Path) -> None:
    """--resume PATH naming an older step of the run: the newer checkpoints are another timeline, kept."""
    root = tmp_path / "r1" / "checkpoints"
    _save(root, 1, 2, 3)
    newer = {s: _hashes(root / f"step_{s:09d}") for s in (2, 3)}
    start = check_run_directory(tmp_path / "r1", _cfg(tmp_path, "r1", f"checkpoint.resume={root / 'step_000000001'}"))
    assert start.resume_path == str(root / "step_000000001")
    _save(root, 2)
    for s, hashes in newer.items():
        assert _hashes(root / "set_aside" / f"step_{s:09d}") == hashes
    assert load_checkpoint(root / "step_000000002").meta["session"] != load_checkpoint(
        root / "set_aside" / "step_000000002").meta["session"]


# A second run with the same name -----------------------------------------------------------------

def test_a_new_run_refuses_a_directory_holding_another_run_and_touches_nothing(tmp_path: Path) -> None:
    run = _finished_run(tmp_path)
    before = _hashes(run)
    with pytest.raises(RunDirectoryError) as info:
        _new_trainer(_cfg(tmp_path, "r1", "checkpoint.resume=never"))
    message = str(info.value)
    assert message.startswith(f"run directory {run} already holds a run: 2 checkpoint(s) in {run / 'checkpoints'} "
                              f"(step_000000004, step_000000002); the finished model {run / 'final'}")
    assert "--resume auto" in message and "--overwrite" in message and "another --name" in message
    assert _hashes(run) == before


def test_overwrite_deletes_the_old_run_only_when_asked_and_logs_each_part(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = _finished_run(tmp_path)
    (run / "ray_train_state.json").write_text("{}")  # Ray Train's own file in the run directory: not ours
    start = check_run_directory(run, _cfg(tmp_path, "r1", "checkpoint.resume=never", "run.overwrite=true"))
    assert _hashes(run)  # the check deleted nothing
    with caplog.at_level(logging.WARNING, logger="fr_train.checkpoint"):
        claim_run_directory(start, "session_x/01000000")
    for part in ("checkpoints", "final", "train_log.jsonl", "config.json"):
        assert not (run / part).exists()
        assert "run.overwrite: deleting" in caplog.text and f"{run / part} (" in caplog.text
    assert (run / "ray_train_state.json").is_file()
    assert json.loads((run / LAUNCH_FILE).read_text())["launch"] == "session_x/01000000"
    assert json.loads(json.dumps(start.to_json()))["replaced"] == [
        str(run / p) for p in ("checkpoints", "final", "train_log.jsonl", "config.json")]


def test_a_fresh_directory_or_one_without_checkpoints_starts(tmp_path: Path) -> None:
    for mode in ("auto", "never"):
        start = check_run_directory(tmp_path / "new", _cfg(tmp_path, "new", f"checkpoint.resume={mode}"))
        assert start.resume_path is None and start.replace == []
    (tmp_path / "died_early").mkdir()  # a run that failed before its first checkpoint: nothing to lose
    (tmp_path / "died_early" / "train_log.jsonl").write_text('{"event": "start"}\n')
    assert check_run_directory(tmp_path / "died_early", _cfg(tmp_path, "died_early")).resume_path is None


def test_a_restart_of_the_same_launch_continues_its_own_progress_and_deletes_nothing(tmp_path: Path) -> None:
    """Ray restarts the workers of a `--resume never --overwrite` launch after a failure: the restart
    must continue what that launch saved, not refuse it nor delete it."""
    run = tmp_path / "r1"
    cfg = _cfg(tmp_path, "r1", "checkpoint.resume=never", "run.overwrite=true")
    claim_run_directory(check_run_directory(run, cfg, launch_id="s/01000000"), "s/01000000")
    _save(run / "checkpoints", 2)  # the launch's own progress
    before = _hashes(run)
    restart = check_run_directory(run, cfg, launch_id="s/01000000")
    assert restart.restart and restart.replace == [] and restart.resume_path == str(run / "checkpoints" / "step_000000002")
    claim_run_directory(restart, "s/01000000")
    assert _hashes(run) == before
    # The next launch (another session: a fresh local cluster reuses job id 01000000) is a new start.
    assert check_run_directory(run, cfg, launch_id="t/01000000").replace == [run / "checkpoints",
                                                                            run / LAUNCH_FILE]
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        check_run_directory(run, _cfg(tmp_path, "r1", "checkpoint.resume=never"), launch_id="t/01000000")


# The flag --------------------------------------------------------------------------------------------

def test_overwrite_flag_sets_run_overwrite_and_means_a_new_run() -> None:
    cfg = config_from_args(build_parser().parse_args(["r18", "arcface", "--name", "x", "--overwrite"]))
    assert cfg.run.overwrite is True and cfg.checkpoint.resume == "never"
    assert config_from_args(build_parser().parse_args(["r18", "arcface"])).run.overwrite is False
    with pytest.raises(ConfigError, match=r"run\.overwrite: true starts a new run in place of the old one, so it "
                                          r"needs checkpoint\.resume=never .*checkpoint\.resume=auto"):
        config_from_args(build_parser().parse_args(["r18", "arcface", "--overwrite", "--resume", "auto"]))


# The real Trainer, end to end --------------------------------------------------------------------

def _starts_of_one_run(rank: int, world: int, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Four starts of run "r" in one process (one DeepSpeed import): fresh; auto over a damaged newest
    checkpoint; a new run without and then with --overwrite."""
    from fr_train.train.trainer import Trainer

    def start(**changes: Any) -> Any:
        cfg = TrainConfig.from_dict(cfg_dict)
        for key, value in changes.items():
            setattr(getattr(cfg, key.split("__")[0]), key.split("__")[1], value)
        return Trainer(cfg, rank, world, torch.device("cpu"))

    run = Path(cfg_dict["run"]["storage"]) / "r"
    root = run / "checkpoints"
    out: dict[str, Any] = {}
    first = start()
    first.fit()
    out["first"] = (first.resumed_from, sorted(p.name for p in root.iterdir()), (run / "final").is_dir())

    _bitflip(root / "step_000000004" / "backbone.pt")
    damaged = _hashes(root / "step_000000004")
    second = start()
    second.fit()
    out["second"] = (second.resumed_from, [h["step"] for h in second.state.history],
                     _hashes(root / "set_aside" / "step_000000004") == damaged,
                     load_checkpoint(root / "step_000000004").step)

    before = _hashes(run)
    try:
        start(checkpoint__resume="never")
        out["never"] = "started"
    except RunDirectoryError as e:
        out["never"] = str(e)
    out["never_unchanged"] = _hashes(run) == before

    third = start(checkpoint__resume="never", run__overwrite=True)
    third.fit()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    out["overwrite"] = (third.resumed_from, [h["step"] for h in third.state.history],
                        (root / "set_aside").exists(), [r for r in log if r["event"] == "start"])
    return out


@pytest.mark.slow
def test_the_trainer_starts_fresh_falls_back_refuses_and_overwrites_only_when_asked(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """About 20 s on 2 CPU cores: four starts of a 4-step run at 32x32 (mbf, fp32, DALI on CPU)."""

    from cluster.launch import prepare_data
    from tests.distributed import run_distributed
    from tests.test_gpu_configuration_on_cpu import TINY

    cfg = build_config("mbf", "arcface", overrides=[
        f"data.cache_dir={tmp_path_factory.mktemp('rundir_cache')}", *TINY, f"run.storage={tmp_path}", "run.name=r",
        "data.batch_size=8", "schedule.max_steps=4", "checkpoint.every_steps=2", "checkpoint.every_minutes=0",
        "eval.enabled=false", "run.export_onnx=false", "run.log_every=1"])
    cfg.data.path = str(prepare_data(cfg))
    out = run_distributed(_starts_of_one_run, 1, cfg.to_dict(), timeout=600)[0]
    root = tmp_path / "r" / "checkpoints"

    assert out["first"] == (None, ["step_000000002", "step_000000004"], True)  # a fresh directory starts
    # auto over a damaged step 4: continues from step 2, trains 3 and 4; the damaged one is kept whole
    assert out["second"] == (str(root / "step_000000002"), [3, 4], True, 4)
    assert out["never"].startswith(f"run directory {tmp_path / 'r'} already holds a run") and out["never_unchanged"]
    resumed_from, steps, set_aside_left, starts = out["overwrite"]
    assert (resumed_from, steps, set_aside_left) == (None, [1, 2, 3, 4], False)
    assert len(starts) == 1  # the replaced run's log went with it: no interleaved "start" events
    assert starts[0]["run_directory"]["replaced"] == [str(tmp_path / "r" / p) for p in
                                                      ("checkpoints", "final", "train_log.jsonl", "config.json",
                                                       "tensorboard")]  # its curves too
