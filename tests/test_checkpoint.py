"""Checkpoints (issue 5): round trip of the real head/backbone state, manifest verification with a
logged fallback, crash safety, keep-K, async semantics, multi-rank commit, resharding, config
compatibility and RNG capture. Everything runs on CPU with tiny sizes."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fr_train.checkpointing import (
    CheckpointManager,
    CorruptCheckpointError,
    SavePolicy,
    capture_rng,
    check_compatible,
    find_latest,
    load_checkpoint,
    reshard_rank_payloads,
    restore_rng,
)
from fr_train.config import TrainConfig
from fr_train.heads import CombinedMargin, PartialFC, VPLConfig, class_shard, reshard_head_states
from tests.distributed import run_distributed

C, D, B = 11, 8, 6  # classes, embedding size, batch


def _head(seed: int = 0) -> PartialFC:
    head = PartialFC(C, D, CombinedMargin(s=16.0, m2=0.3), sample_rate=0.5,
                     vpl=VPLConfig(lambda_=0.2, delta_t=5, start_iter=0), seed=seed)
    head.make_optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    return head


def _backbone() -> tuple[nn.Module, torch.optim.SGD]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _step(model: nn.Module, opt: torch.optim.Optimizer, head: PartialFC, gen: torch.Generator) -> float:
    x = torch.randn(B, 5, generator=gen)
    y = torch.randint(0, C, (B,), generator=gen)
    loss = head(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert head.optimizer is not None
    head.optimizer.step()
    head.optimizer.zero_grad()
    return float(loss.detach())


def _meta(cfg: dict[str, Any] | None = None, num_classes: int = C) -> dict[str, Any]:
    return {"epoch": 0, "samples_seen": 0, "num_classes": num_classes, "config": cfg or TrainConfig().to_dict()}


def _payload(step: int, head: PartialFC | None = None, head_state: dict | None = None, **extra: Any) -> dict:
    state = head_state if head_state is not None else (None if head is None else head.state_dict())
    return {"train": {"step": step, "epoch": 0, "samples_seen": step * B}, "head": state,
            "data": extra.get("data"), "rng": extra.get("rng")}


def _save_small(mgr: CheckpointManager, step: int, head: PartialFC | None = None) -> None:
    mgr.save(step, _payload(step, head), {"backbone": {"w": torch.full((4,), float(step))}}, _meta())


# Round trip ----------------------------------------------------------------------------------------

def test_round_trip_resumes_head_vpl_optimizer_and_backbone_exactly(tmp_path: Path) -> None:
    """After restoring a checkpoint into fresh objects, the next step matches the uninterrupted run."""
    gen = torch.Generator().manual_seed(0)
    model, opt, head = *_backbone(), _head()
    for _ in range(3):
        _step(model, opt, head, gen)
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1)
    mgr.save_async(3, _payload(3, head, rng=capture_rng()),
                   {"backbone": model.state_dict(), "optimizer": opt.state_dict()}, _meta())
    mgr.close()
    gen_state = gen.get_state()
    expected = _step(model, opt, head, gen)

    ckpt = mgr.latest()
    assert ckpt is not None and ckpt.step == 3 and ckpt.world_size == 1
    model2, opt2, head2 = *_backbone(), _head(seed=0)
    shared = ckpt.shared()
    assert shared is not None
    model2.load_state_dict(shared["backbone"])
    opt2.load_state_dict(shared["optimizer"])
    payload = ckpt.payload_for(0, 1)
    head2.load_state_dict(payload["head"])
    restore_rng(payload["rng"])
    assert payload["train"] == {"step": 3, "epoch": 0, "samples_seen": 18}
    assert torch.count_nonzero(head2.vpl_memory_iter >= 0) > 0  # the bank was written and restored
    assert _step(model2, opt2, head2, gen.set_state(gen_state)) == pytest.approx(expected, rel=0, abs=0)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(head.weight, head2.weight) and torch.equal(head.vpl_memory, head2.vpl_memory)


def test_every_file_loads_with_weights_only_and_the_manifest_lists_it(tmp_path: Path) -> None:
    model, opt, head = *_backbone(), _head()
    _step(model, opt, head, torch.Generator().manual_seed(1))
    mgr = CheckpointManager(tmp_path, keep=1, rank=0, world=1)
    mgr.save(1, _payload(1, head, rng=capture_rng(), data={"dali_checkpoint": b"\x01\x02", "epoch": 0}),
             {"backbone": model.state_dict(), "optimizer": opt.state_dict()}, _meta())
    d = tmp_path / "step_000000001"
    manifest = json.loads((d / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == ["backbone.pt", "meta.json", "rank_0.pt"]
    assert sorted(p.name for p in d.iterdir()) == ["MANIFEST.json", "backbone.pt", "meta.json", "rank_0.pt"]
    for name in ("backbone.pt", "rank_0.pt"):
        torch.load(d / name, weights_only=True)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["num_classes"] == C and meta["code_version"]
    assert meta["config"]["backbone"]["name"] == TrainConfig().backbone.name


def test_unloadable_payload_is_refused_at_save_time_naming_the_key(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=1, rank=0, world=1)
    with pytest.raises(TypeError, match=r"\['data'\]\['order'\].*numpy"):
        mgr.save(1, _payload(1, data={"order": np.arange(3)}), None, _meta())
    with pytest.raises(ValueError, match="meta"):
        mgr.save(1, _payload(1), None, {"epoch": 0})
    with pytest.raises(ValueError, match="unknown key"):
        mgr.save(1, {**_payload(1), "model": {}}, None, _meta())
    assert find_latest(tmp_path) is None


# Verification and fallback -------------------------------------------------------------------------

def _truncate(p: Path) -> None:
    with p.open("r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _bitflip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "name", "reason"), [
    (_truncate, "rank_0.pt", "size"),
    (_bitflip, "backbone.pt", "sha256"),
    (Path.unlink, "rank_0.pt", "missing"),
    (Path.unlink, "MANIFEST.json", "missing"),
    (lambda p: p.write_text("{not json"), "MANIFEST.json", "not valid JSON"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any, name: str, reason: str) -> None:
    mgr = CheckpointManager(tmp_path, keep=3, rank=0, world=1)
    head = _head()
    _save_small(mgr, 1, head)
    _save_small(mgr, 2, head)
    damage(tmp_path / "step_000000002" / name)
    with caplog.at_level(logging.WARNING, logger="fr_train.checkpoint"):
        ckpt = mgr.latest()
    assert ckpt is not None and ckpt.step == 1
    shared = ckpt.shared()
    assert shared is not None and torch.equal(shared["backbone"]["w"], torch.full((4,), 1.0))
    line = caplog.text
    assert "step 2 skipped" in line and f"step_000000002/{name}" in line and reason in line


def test_no_valid_checkpoint_means_none_and_an_explicit_bad_path_raises(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3, rank=0, world=1)
    assert mgr.latest() is None
    _save_small(mgr, 1)
    _bitflip(tmp_path / "step_000000001" / "rank_0.pt")
    assert mgr.latest() is None
    with pytest.raises(ValueError, match=r"rank_0\.pt: sha256"):
        mgr.load(tmp_path / "step_000000001")


@pytest.mark.parametrize("entry", ["../../../outside.pt", "ABSOLUTE", "sub/../../../../outside.pt"])
def test_a_manifest_entry_outside_the_checkpoint_is_refused_naming_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, entry: str) -> None:
    """A manifest listing '../x' or '/x' (with the right size and sha256, so that only the path gives it
    away) is refused before any file is hashed or read; the fallback skips it with a log line."""
    root = tmp_path / "run" / "checkpoints"
    mgr = CheckpointManager(root, keep=3, rank=0, world=1)
    _save_small(mgr, 1)
    _save_small(mgr, 2)
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"a file that is not part of any checkpoint")
    name = str(outside) if entry == "ABSOLUTE" else entry
    step2 = root / "step_000000002"
    manifest = json.loads((step2 / "MANIFEST.json").read_text())
    manifest["files"][name] = {"size": outside.stat().st_size, "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    (step2 / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=rf"step_000000002/MANIFEST\.json: entry '{name}' is not a file "
                                                     r"name inside .*step_000000002"):
        load_checkpoint(step2)
    with caplog.at_level(logging.WARNING, logger="fr_train.checkpoint"):
        ckpt = mgr.latest()
    assert ckpt is not None and ckpt.step == 1
    assert "step 2 skipped" in caplog.text and f"entry '{name}'" in caplog.text


def test_resuming_from_a_directory_that_is_not_a_checkpoint_says_so_and_what_to_pass(tmp_path: Path) -> None:
    """A wrong --resume path is not "a write that never finished": the error says what the path is
    and lists what --resume takes. A manifest-less directory holding checkpoint files keeps that wording."""
    what_to_pass = r"--resume \(checkpoint\.resume\) takes .*STORAGE/RUN/checkpoints/step_N, auto .* or never"
    elsewhere = tmp_path / "my_notes"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match=rf"my_notes: is not an fr_train checkpoint: it has no "
                                                     rf"MANIFEST\.json .*{what_to_pass}") as info:
        load_checkpoint(elsewhere)
    assert "never finished" not in str(info.value)

    run = tmp_path / "runs" / "r1"  # the run directory instead of one of its checkpoints
    _save_small(CheckpointManager(run / "checkpoints", keep=1, rank=0, world=1), 1)
    with pytest.raises(CorruptCheckpointError, match=rf"r1: is not an fr_train checkpoint.*it holds checkpoints/: "
                                                     rf"pass one of .*r1/checkpoints/step_\*.*{what_to_pass}"):
        load_checkpoint(run)
    with pytest.raises(CorruptCheckpointError, match=rf"nowhere: does not exist\. {what_to_pass}"):
        load_checkpoint(tmp_path / "nowhere")

    (run / "checkpoints" / "step_000000001" / "MANIFEST.json").unlink()  # a partial write, by its files
    partial = run / "checkpoints" / "copied_elsewhere"
    (run / "checkpoints" / "step_000000001").rename(partial)
    with pytest.raises(CorruptCheckpointError, match=r"copied_elsewhere/MANIFEST\.json: missing \(the write never "
                                                     r"finished"):
        load_checkpoint(partial)


def _write_then_get_killed(root: str) -> None:
    """Child process: one complete checkpoint, then a large one that the parent kills mid-write."""
    mgr = CheckpointManager(root, keep=3, rank=0, world=1)
    _save_small(mgr, 1)
    big = {"blob": torch.ones(64 << 20)}  # 256 MB: the write takes far longer than the parent's poll
    mgr.save_async(2, _payload(2, data=big), {"backbone": {"w": torch.zeros(4)}}, _meta())
    time.sleep(600)


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    proc = mp.get_context("spawn").Process(target=_write_then_get_killed, args=(str(tmp_path),))
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            partial = list(tmp_path.glob(".tmp-step_000000002-*/rank_0.pt"))
            if partial and partial[0].stat().st_size > (1 << 20):
                break
            time.sleep(0.001)
        else:
            pytest.fail("the child never started writing step 2")
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not (tmp_path / "step_000000002").exists()
    ckpt = find_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 1
    # The next attempt writes step 2 again and clears the dead attempt's temporary directory.
    _save_small(CheckpointManager(tmp_path, keep=3, rank=0, world=1), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000001", "step_000000002"]


# Retention and async semantics ---------------------------------------------------------------------

def test_only_the_newest_k_checkpoints_are_kept(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1)
    for step in range(1, 6):
        mgr.save_async(step, _payload(step), None, _meta())
    mgr.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000004", "step_000000005"]


def test_resuming_from_an_older_step_sets_the_newer_ones_aside(tmp_path: Path) -> None:
    """After resuming at step 1, the old timeline's steps 2 and 3 must never be picked as 'latest'
    again, nor be replaced by the new step 2: both move, whole, to set_aside/ (tests/test_run_directory.py)."""
    old = CheckpointManager(tmp_path, keep=5, rank=0, world=1)
    for step in (1, 2, 3):
        _save_small(old, step)
    _save_small(CheckpointManager(tmp_path, keep=5, rank=0, world=1), 2)
    ckpt = find_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 2 and ckpt.meta["session"] != old.session
    assert sorted(p.name for p in (tmp_path / "set_aside").iterdir()) == ["step_000000002", "step_000000003"]
    assert load_checkpoint(tmp_path / "set_aside" / "step_000000002").meta["session"] == old.session


def test_save_async_snapshots_the_state_and_orders_the_writes(tmp_path: Path) -> None:
    """The caller may mutate its tensors right after save_async; a second save waits for the first."""
    mgr = CheckpointManager(tmp_path, keep=5, rank=0, world=1)
    weights = torch.zeros(1 << 20)
    mgr.save_async(1, _payload(1, data={"w": weights}), None, _meta())
    weights.fill_(7.0)  # training goes on while the write runs
    mgr.save_async(2, _payload(2, data={"w": weights}), None, _meta())
    assert (tmp_path / "step_000000001" / "MANIFEST.json").is_file()  # committed before save 2 began
    mgr.wait()
    assert mgr.last_timing is not None and mgr.last_timing.step == 2 and mgr.last_timing.bytes_written > 4 << 20
    first = find_latest(tmp_path)
    assert first is not None and first.step == 2
    assert torch.all(first.rank_payload(0)["data"]["w"] == 7.0)
    assert torch.all(mgr.load(tmp_path / "step_000000001").rank_payload(0)["data"]["w"] == 0.0)


def test_private_payload_skips_only_the_rank_copy_never_the_live_backbone(tmp_path: Path) -> None:
    """``private_payload=True`` trusts the head state's own clone; the backbone's live tensors are
    still copied, so a training step during the write cannot leak into the checkpoint."""
    model, _ = _backbone()
    head = _head()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(tmp_path, keep=1, rank=0, world=1)
    mgr.save_async(1, _payload(1, head), {"backbone": model.state_dict()}, _meta(), private_payload=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mgr.wait()
    ckpt = find_latest(tmp_path)
    assert ckpt is not None
    shared = ckpt.shared()
    assert shared is not None
    for k, v in shared["backbone"].items():
        assert torch.equal(v, before[k]), k


def test_a_failed_background_write_is_raised_by_the_next_wait(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    mgr = CheckpointManager(blocker / "ckpt", keep=1, rank=0, world=1)
    mgr.save_async(4, _payload(4), None, _meta())
    with pytest.raises(RuntimeError, match=r"checkpoint of step 4 .* failed on rank 0"):
        mgr.wait()
    mgr.close()  # the error is reported once


def test_rank_0_gives_up_the_commit_when_another_rank_failed_to_write(tmp_path: Path) -> None:
    """A rank whose write fails says so in the shared directory; rank 0 reports it instead of waiting."""
    mgrs = [CheckpointManager(tmp_path, keep=1, rank=r, world=2, session="attempt") for r in range(2)]
    (mgrs[1].tmp_dir(1) / "rank_1.pt").mkdir(parents=True)  # rank 1 cannot create its file
    mgrs[1].save_async(1, _payload(1), None, None)
    with pytest.raises(RuntimeError, match="failed on rank 1"):
        mgrs[1].wait()
    mgrs[0].save_async(1, _payload(1), None, _meta())
    with pytest.raises(RuntimeError, match=r"rank_1\.failed\.json: IsADirectoryError"):
        mgrs[0].wait()
    assert find_latest(tmp_path) is None


def test_a_step_is_saved_once_and_steps_increase(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1)
    _save_small(mgr, 5)
    with pytest.raises(ValueError, match="step 5 is not after the last saved step 5"):
        _save_small(mgr, 5)


def test_save_policy_triggers_on_steps_minutes_epoch_end_and_stop() -> None:
    p = SavePolicy(every_steps=10, every_minutes=1.0, last_save_time=100.0)
    assert not p.due(5, now=159.0) and p.due(10, now=101.0) and p.due(5, now=160.0)
    assert p.due(3, epoch_end=True, now=100.0) and p.due(3, stopping=True, now=100.0)
    p.saved(now=160.0)
    assert not p.due(11, now=200.0)


# Several ranks ------------------------------------------------------------------------------------

def _save_on_rank(rank: int, world: int, root: str) -> dict[str, list]:
    from fr_train.checkpointing import broadcast_session_token

    gen = torch.Generator().manual_seed(rank)
    model, opt, head = *_backbone(), _head()
    _step(model, opt, head, gen)
    mgr = CheckpointManager(root, keep=2, rank=rank, world=world, session=broadcast_session_token())
    mgr.save_async(1, _payload(1, head, rng=capture_rng()),
                   {"backbone": model.state_dict()} if rank == 0 else None, _meta() if rank == 0 else None)
    mgr.close()
    # Plain lists: tensors would travel through shared memory that dies with this process.
    return {"weight": head.weight.detach().tolist(), "memory": head.vpl_memory.tolist()}


def test_two_ranks_write_one_checkpoint_holding_both_shards(tmp_path: Path) -> None:
    states = run_distributed(_save_on_rank, 2, str(tmp_path))
    ckpt = find_latest(tmp_path)
    assert ckpt is not None and ckpt.world_size == 2
    assert sorted(ckpt.manifest["files"]) == ["backbone.pt", "meta.json", "rank_0.pt", "rank_1.pt"]
    for r in range(2):
        head = ckpt.rank_payload(r)["head"]
        assert (head["rank"], head["world_size"]) == (r, 2)
        assert head["rows"]["weight"].tolist() == states[r]["weight"]
        assert head["rows"]["vpl_memory"].tolist() == states[r]["memory"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000001"]


# Resharding ---------------------------------------------------------------------------------------

def _trained_state() -> dict[str, Any]:
    model, opt, head = *_backbone(), _head()
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        _step(model, opt, head, gen)
    return head.state_dict()


def _save_world(root: Path, world: int, single: dict[str, Any]) -> None:
    """A W-rank checkpoint written by W managers (threads of this process share one session)."""
    shards = reshard_head_states([single], world)
    mgrs = [CheckpointManager(root, keep=3, rank=r, world=world, session="shared_attempt") for r in range(world)]
    for r in reversed(range(world)):  # rank 0 last: its commit waits for the other ranks' files
        mgrs[r].save_async(7, _payload(7, head_state=shards[r], rng=capture_rng(), data={"pos": r}),
                           None, _meta() if r == 0 else None)
    for m in mgrs:
        m.close()


@pytest.mark.parametrize(("src", "dst"), [(2, 1), (1, 2), (4, 2), (2, 2)])
def test_a_checkpoint_resumes_on_another_world_size(tmp_path: Path, src: int, dst: int) -> None:
    single = _trained_state()
    _save_world(tmp_path, src, single)
    ckpt = find_latest(tmp_path)
    assert ckpt is not None and ckpt.world_size == src
    out = [ckpt.payload_for(r, dst) for r in range(dst)]
    for key in ("weight", "vpl_memory", "vpl_memory_iter"):
        assert torch.equal(torch.cat([p["head"]["rows"][key] for p in out]), single["rows"][key]), key
    momentum = torch.cat([p["head"]["optimizer"]["rows"]["weight"]["momentum_buffer"] for p in out])
    assert torch.equal(momentum, single["optimizer"]["rows"]["weight"]["momentum_buffer"])
    for r, p in enumerate(out):
        shard = class_shard(C, dst, r)
        assert (p["head"]["class_start"], p["head"]["num_local"]) == (shard.class_start, shard.num_local)
        assert p["train"] == {"step": 7, "epoch": 0, "samples_seen": 7 * B}  # global: survives any world
        same = src == dst
        assert (p["data"] == {"pos": r}) if same else p["data"] is None
        assert (p["rng"] is not None) == same
    if dst == 1:
        head = _head()
        head.load_state_dict(out[0]["head"])
        assert torch.equal(head.weight.detach(), single["rows"]["weight"])


def test_reshard_refuses_payloads_from_different_steps() -> None:
    single = _trained_state()
    a, b = (_payload(s, head_state=h) for s, h in zip((1, 2), reshard_head_states([single], 2), strict=True))
    with pytest.raises(ValueError, match="key 'train' of rank 1"):
        reshard_rank_payloads([a, b], 1)


# Compatibility and RNG -----------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "change"), [
    ("num_classes", None),
    ("backbone.name", ("backbone", "name", "r100")),
    ("backbone.embedding_size", ("backbone", "embedding_size", 256)),
    ("head.vpl", ("head", "vpl", True)),
])
def test_a_checkpoint_of_an_incompatible_config_is_refused_naming_the_field(
        tmp_path: Path, field: str, change: tuple[str, str, Any] | None) -> None:
    mgr = CheckpointManager(tmp_path, keep=1, rank=0, world=1)
    _save_small(mgr, 1)
    ckpt = mgr.latest()
    assert ckpt is not None
    cfg = TrainConfig().to_dict()
    ckpt.check_compatible(cfg, C)
    num_classes = C + 1 if change is None else C
    if change is not None:
        cfg[change[0]][change[1]] = change[2]
    with pytest.raises(ValueError, match=rf"field '{field}'"):
        ckpt.check_compatible(cfg, num_classes)
    with pytest.raises(ValueError, match=rf"field '{field}'"):
        check_compatible(ckpt.meta, cfg, num_classes)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_capture_restore_replays_python_numpy_and_torch_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = _draws()
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected
