"""A checkpoint of a head that lives on the GPU: the state goes straight to host memory (never a
second copy of the shard on the device), and loads back onto the device bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fr_train.checkpointing import CheckpointManager, find_latest
from fr_train.heads import CombinedMargin, PartialFC, VPLConfig

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
