"""Reusable host staging buffers (issue 13): a save copies the state into host buffers the
CheckpointManager keeps from one save to the next, and the components hand over their live tensors
on that path so the staging buffer is the only copy. Real heads, backbones and files, on the CPU
(the pinned, non_blocking CUDA path: tests/test_checkpoint_gpu.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fr_train.checkpointing import CheckpointManager, find_latest
from fr_train.checkpointing.stateful import CheckpointStates, State
from fr_train.config import TrainConfig
from fr_train.heads import CombinedMargin, PartialFC, VPLConfig
from fr_train.train.state import TrainState

C, D, B = 11, 8, 6
HEAD_WEIGHT = "rank 0 payload['payload']['head']['rows']['weight']"  # the staging buffer's key: the key path


def _head() -> PartialFC:
    head = PartialFC(C, D, CombinedMargin(s=16.0, m2=0.3), sample_rate=0.5,
                     vpl=VPLConfig(lambda_=0.2, delta_t=5, start_iter=0), seed=0)
    head.make_optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    return head


class _Run:
    """A backbone, its optimizer and a PartialFC head, trained a step at a time, as a Trainer's states."""

    def __init__(self) -> None:
        torch.manual_seed(3)
        self.model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, D))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.head = _head()
        self.train = TrainState()
        self.gen = torch.Generator().manual_seed(0)
        self.states = CheckpointStates((State("train", self.train), State("head", self.head),
                                        State("backbone", self.model, shared=True),
                                        State("optimizer", self.opt, shared=True)))

    def step(self) -> None:
        x = torch.randn(B, 5, generator=self.gen)
        y = torch.randint(0, C, (B,), generator=self.gen)
        loss = self.head(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        assert self.head.optimizer is not None
        self.head.optimizer.step()
        self.head.optimizer.zero_grad()
        self.train.step += 1
        self.train.samples_seen += B


def _meta() -> dict[str, Any]:
    return {"epoch": 0, "samples_seen": 0, "num_classes": C, "config": TrainConfig().to_dict()}


def _payload(step: int, **data: Any) -> dict[str, Any]:
    return {"train": {"step": step, "epoch": 0, "samples_seen": step * B}, "head": None, "data": data or None,
            "rng": None}


def _ptrs(mgr: CheckpointManager) -> dict[str, int]:
    return {path: b.tensor.data_ptr() for path, b in mgr.staging._buffers.items()}


def test_a_second_save_reuses_the_host_buffers_and_writes_what_a_fresh_copy_writes(tmp_path: Path) -> None:
    run = _Run()
    run.step()
    threads = torch.get_num_threads()
    mgr = CheckpointManager(tmp_path / "staged", keep=2, rank=0, world=1, states=run.states, pin_memory=False)
    mgr.save_states(1, _meta())
    mgr.wait()
    assert torch.get_num_threads() == threads  # the small copies ran on one thread; the setting is back
    first = _ptrs(mgr)
    assert HEAD_WEIGHT in first and mgr.last_timing is not None and mgr.last_timing.staged_bytes > 0
    assert mgr.staging.nbytes >= sum(t.nbytes for t in run.model.state_dict().values())
    run.step()  # the buffers take the new values
    mgr.save_states(2, _meta())
    mgr.wait()
    assert _ptrs(mgr) == first  # the same host storage, nothing allocated
    assert mgr.last_timing is not None and mgr.last_timing.step == 2 and mgr.last_timing.staged_bytes == 0

    # The same state saved the pre-staging way: the head's own private copy, a fresh manager.
    fresh = CheckpointManager(tmp_path / "fresh", keep=1, rank=0, world=1)
    fresh.save(2, {"train": run.train.state_dict(), "head": run.head.state_dict()},
               {"backbone": run.model.state_dict(), "optimizer": run.opt.state_dict()}, _meta(),
               private_payload=True)
    for name in ("rank_0.pt", "backbone.pt"):
        staged = (tmp_path / "staged" / "step_000000002" / name).read_bytes()
        assert staged == (tmp_path / "fresh" / "step_000000002" / name).read_bytes(), name
    ckpt = find_latest(tmp_path / "staged")
    assert ckpt is not None
    assert torch.equal(ckpt.payload_for(0, 1)["head"]["rows"]["weight"], run.head.weight.detach())


def test_a_tensor_mutated_right_after_save_async_returns_is_written_as_it_was(tmp_path: Path) -> None:
    run = _Run()
    run.step()
    mgr = CheckpointManager(tmp_path, keep=3, rank=0, world=1, states=run.states, pin_memory=False)
    for step in (1, 2):  # the first save allocates the buffers, the second reuses them
        head_before = run.head.weight.detach().clone()
        model_before = {k: v.clone() for k, v in run.model.state_dict().items()}
        mgr.save_states(step, _meta())
        with torch.no_grad():  # training goes on while the write runs
            run.head.weight.add_(1.0)
            for p in run.model.parameters():
                p.add_(1.0)
        run.train.step += 1
        mgr.wait()
        ckpt = find_latest(tmp_path)
        assert ckpt is not None and ckpt.step == step
        assert torch.equal(ckpt.payload_for(0, 1)["head"]["rows"]["weight"], head_before)
        shared = ckpt.shared()
        assert shared is not None
        for k, v in shared["backbone"].items():
            assert torch.equal(v, model_before[k]), k
    # Outside a save, head.state_dict() is still the user's private copy.
    assert run.head.state_dict()["rows"]["weight"].data_ptr() != run.head.weight.data_ptr()


def test_a_new_shape_or_dtype_gets_a_new_buffer_and_an_unsaved_path_loses_its_own(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=5, rank=0, world=1, pin_memory=False)
    path = "rank 0 payload['payload']['data']['w']"
    mgr.save(1, _payload(1, w=torch.zeros(4), v=torch.ones(3)), None, _meta())
    buf = mgr.staging.buffer(path)
    assert buf is not None and buf.shape == (4,)
    mgr.save(2, _payload(2, w=torch.arange(8.0), v=torch.ones(3)), None, _meta())
    grown = mgr.staging.buffer(path)
    assert grown is not None and grown.shape == (8,) and mgr.last_timing is not None
    assert mgr.last_timing.staged_bytes == 8 * 4  # only the changed tensor was reallocated
    mgr.save(3, _payload(3, w=torch.arange(8, dtype=torch.float64)), None, _meta())
    retyped = mgr.staging.buffer(path)
    assert retyped is not None and retyped.dtype == torch.float64
    assert mgr.staging.buffer("rank 0 payload['payload']['data']['v']") is None  # not saved any more
    ckpt = find_latest(tmp_path)
    assert ckpt is not None
    assert torch.equal(ckpt.rank_payload(0)["data"]["w"], torch.arange(8, dtype=torch.float64))
    assert torch.equal(mgr.load(tmp_path / "step_000000002").rank_payload(0)["data"]["w"], torch.arange(8.0))

    # A non-contiguous tensor: the file holds what a clone() would (its dense copy), not the view's storage.
    base = torch.arange(12.0).reshape(3, 4)
    mgr.save(4, _payload(4, w=base[:, ::2]), None, _meta())
    assert torch.equal(mgr.load(tmp_path / "step_000000004").rank_payload(0)["data"]["w"], base[:, ::2])


def test_a_leaf_that_is_not_checkpointable_is_still_refused_naming_its_path(tmp_path: Path) -> None:
    class Reader:  # a data reader whose state holds a numpy array
        def state_dict(self) -> dict[str, Any]:
            return {"order": np.arange(3)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    run = _Run()
    run.step()
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1, states=run.states, pin_memory=False)
    mgr.save_states(1, _meta())
    mgr.wait()
    staged = _ptrs(mgr)
    mgr.states = CheckpointStates((*run.states.states, State("data", Reader())))
    run.train.step = 2
    with pytest.raises(TypeError, match=r"\['data'\]\['order'\].*numpy"):
        mgr.save_states(2, _meta())
    assert _ptrs(mgr) == staged  # a refused save keeps the buffers it did not reach
    mgr.states = run.states  # step 2 was refused, not saved: it may be saved now
    mgr.save_states(2, _meta(), sync=True)
    assert _ptrs(mgr) == staged
    ckpt = find_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 2


def test_close_releases_the_buffers_and_a_later_save_allocates_them_again(tmp_path: Path) -> None:
    run = _Run()
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1, states=run.states, pin_memory=False)
    mgr.save_states(0, _meta())
    mgr.close()
    assert mgr.staging.nbytes == 0 and mgr.staging.buffer(HEAD_WEIGHT) is None
    run.step()
    mgr.save_states(1, _meta(), sync=True)
    assert mgr.staging.buffer(HEAD_WEIGHT) is not None
    assert mgr.last_timing is not None and mgr.last_timing.staged_bytes > 0
    mgr.close()


def test_on_the_save_path_a_head_hands_over_its_live_tensors_and_state_dict_stays_a_private_copy() -> None:
    """``collect(copy=False)`` (what the manager's staging copies) holds the head's own tensors, so a
    save makes one host copy, not two; ``head.state_dict()`` is still a copy a user may keep."""
    head = _head()
    states = CheckpointStates((State("head", head),))
    live, _ = states.collect(0, copy=False)
    copied, _ = states.collect(0, copy=True)
    momentum = head.optimizer.state[head.weight]["momentum_buffer"]  # type: ignore[union-attr]
    assert live["head"]["rows"]["weight"].data_ptr() == head.weight.data_ptr()
    assert live["head"]["optimizer"]["rows"]["weight"]["momentum_buffer"].data_ptr() == momentum.data_ptr()
    assert live["head"]["rows"]["vpl_memory"].data_ptr() == head.vpl_memory.data_ptr()
    for state in (copied["head"], head.state_dict()):
        assert state["rows"]["weight"].data_ptr() != head.weight.data_ptr()
        assert torch.equal(state["rows"]["weight"], head.weight.detach())
        assert state["optimizer"]["rows"]["weight"]["momentum_buffer"].data_ptr() != momentum.data_ptr()


def test_staging_ahead_leaves_the_first_save_nothing_to_allocate(tmp_path: Path) -> None:
    """``stage_ahead()`` (the Trainer calls it after resuming) allocates every buffer the state needs,
    so the run's first save only copies; what it wrote is still the state at the save."""
    run = _Run()
    run.step()
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1, states=run.states)
    allocated = mgr.stage_ahead()
    assert allocated > C * D * 4 and mgr.staging.buffer(HEAD_WEIGHT) is not None
    run.step()  # the state moves on after staging ahead: the save must write the new one
    mgr.save_states(run.train.step, _meta())
    mgr.close()
    assert mgr.last_timing is not None and mgr.last_timing.staged_bytes == 0
    ckpt = find_latest(tmp_path)
    assert ckpt is not None
    assert torch.equal(ckpt.payload_for(0, 1)["head"]["rows"]["weight"], run.head.weight.detach())


def test_a_head_subclass_that_extends_state_dict_but_not_live_state_is_refused_at_definition() -> None:
    """Checkpoints save ``live_state()``: extra state added in ``state_dict()`` alone would be lost."""
    with pytest.raises(TypeError, match=r"overrides state_dict\(\) but not live_state\(\)"):
        class _Forgetful(PartialFC):
            def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
                return {**super().state_dict(), "extra": 1}
