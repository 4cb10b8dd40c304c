"""A checkpoint of a head that lives on the GPU: the state goes straight to host memory (never a
second copy of the shard on the device), and loads back onto the device bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fr_train.checkpointing import CheckpointManager, find_latest
from fr_train.checkpointing.staging import HostStaging
from fr_train.checkpointing.stateful import CheckpointStates, State
from fr_train.heads import CombinedMargin, PartialFC, VPLConfig
from fr_train.train.state import TrainState

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _head(storage_dtype: torch.dtype) -> PartialFC:
    head = PartialFC(200_000, 512, CombinedMargin(m2=0.5), sample_rate=0.1, seed=3, device=torch.device("cuda"),
                     storage_dtype=storage_dtype, vpl=VPLConfig(start_iter=0, delta_t=100))
    head.make_optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    return head


def _train(head: PartialFC, steps: int, seed: int) -> list[float]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(128, 512, generator=gen, device="cuda")
        y = torch.randint(0, head.num_classes, (128,), generator=gen, device="cuda")
        loss = head(x, y)
        loss.backward()
        assert head.optimizer is not None
        head.optimizer.step()
        head.optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16])
def test_gpu_head_checkpoint_round_trips_through_host_memory(tmp_path: Path, storage_dtype: torch.dtype) -> None:
    head = _head(storage_dtype)
    _train(head, 3, seed=0)
    torch.cuda.synchronize()
    shard_bytes = sum(t.numel() * t.element_size() for t in (head.weight, head.vpl_memory))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    state = head.state_dict()
    # The host copy costs the device nothing (a clone() first would add the whole shard).
    assert torch.cuda.max_memory_allocated() - before < 0.05 * shard_bytes
    rows = state["rows"]
    assert rows["weight"].device.type == "cpu" and rows["weight"].dtype == storage_dtype
    assert torch.equal(rows["weight"], head.weight.detach().cpu())

    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1)
    mgr.save_async(3, {"train": {"step": 3, "epoch": 0, "samples_seen": 384}, "head": state, "data": None,
                       "rng": None}, {"backbone": {}}, {"epoch": 0, "samples_seen": 384, "num_classes": 200_000,
                                                        "config": {}}, private_payload=True)
    expected = _train(head, 4, seed=1)  # training goes on while the write runs
    mgr.close()

    ckpt = find_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 3
    restored = _head(storage_dtype)
    restored.load_state_dict(ckpt.payload_for(0, 1)["head"])
    assert restored.weight.device.type == "cuda"
    assert torch.equal(restored.weight.cpu(), rows["weight"])
    assert _train(restored, 4, seed=1) == expected  # the same steps from the restored state, bitwise


def test_device_to_host_copies_are_queued_into_pinned_buffers_and_synchronised_once() -> None:
    """The non_blocking path: with the stream busy, the copy is only queued when ``copy`` returns
    (the host did not wait for it), and the end of the staging pass waits for it. The buffer is
    page-locked at its exact size (not rounded up to a power of two by PyTorch's pinned allocator)."""
    src = torch.randn((1 << 24) + 3, device="cuda")  # 64 MiB + 12 B: a power-of-two rounding would show
    staging = HostStaging(pin_memory=True)
    with staging.copying():  # the first pass allocates and page-locks the buffer
        staging.copy("x", src)
    buf = staging.buffer("x")
    assert buf is not None and buf.device.type == "cpu" and buf.is_pinned()
    assert staging.nbytes == src.nbytes
    src.mul_(2)
    expected = src.cpu()
    stream = torch.cuda.current_stream()
    with staging.copying():  # the second reuses it: only the copy is timed against the stream
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the copy
        assert staging.copy("x", src).data_ptr() == buf.data_ptr()
        assert not stream.query()  # still queued: no blocking copy per tensor
    assert stream.query()  # one synchronisation at the end of the pass
    assert torch.equal(buf, expected)
    staging.release()
    assert staging.nbytes == 0


def test_gpu_state_is_staged_in_pinned_buffers_reused_from_save_to_save(tmp_path: Path) -> None:
    head = _head(torch.float32)
    _train(head, 2, seed=0)
    train = TrainState(step=2)
    backbone = torch.nn.Linear(512, 512, device="cuda")
    states = CheckpointStates((State("train", train), State("head", head), State("backbone", backbone, shared=True)))
    mgr = CheckpointManager(tmp_path, keep=2, rank=0, world=1, states=states, pin_memory=True)
    meta = {"epoch": 0, "samples_seen": 0, "num_classes": 200_000, "config": {}}
    weight_path = "rank 0 payload['payload']['head']['rows']['weight']"
    before = head.weight.detach().cpu()

    mgr.save_states(2, meta)
    buf = mgr.staging.buffer(weight_path)
    assert buf is not None and buf.device.type == "cpu" and buf.is_pinned()
    assert torch.equal(buf, before)  # complete when save_async returns: the writer never sees a partial copy
    sampler = mgr.staging.buffer("rank 0 payload['payload']['head']['sampler_rng']")
    assert sampler is not None and not sampler.is_pinned()  # a CPU source: a plain buffer
    with torch.no_grad():
        head.weight.add_(1.0)  # training goes on while the write runs
    mgr.wait()
    ckpt = find_latest(tmp_path)
    assert ckpt is not None and torch.equal(ckpt.payload_for(0, 1)["head"]["rows"]["weight"], before)

    ptr = buf.data_ptr()
    _train(head, 1, seed=1)
    train.step = 3
    mgr.save_states(3, meta)
    mgr.wait()
    again = mgr.staging.buffer(weight_path)
    assert again is not None and again.data_ptr() == ptr
    assert mgr.last_timing is not None and mgr.last_timing.staged_bytes == 0
    ckpt = find_latest(tmp_path)
    assert ckpt is not None and ckpt.step == 3
    assert torch.equal(ckpt.payload_for(0, 1)["head"]["rows"]["weight"], head.weight.detach().cpu())
    mgr.close()
    assert mgr.staging.nbytes == 0
