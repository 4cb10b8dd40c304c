"""PartialFC without torch.distributed (world size 1): state handling, eval mode, sampler RNG."""

from __future__ import annotations

import torch

from fr_train.heads import CombinedMargin, PartialFC, VPLConfig, scale_backbone_grad


def _batch(seed: int, n: int = 6, classes: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_works_without_torch_distributed_as_world_one() -> None:
    assert not torch.distributed.is_initialized()
    head = PartialFC(30, 8, CombinedMargin.arcface(), sample_rate=0.3)
    assert (head.class_start, head.num_local, head.comm.world_size) == (0, 30, 1)
    x, y = _batch(0)
    x.requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and head.weight.grad.is_sparse
    assert head.weight.grad.coalesce().indices()[0].tolist() == head.last_sampled_classes.tolist()


def test_eval_forward_uses_all_classes_and_changes_no_state() -> None:
    head = PartialFC(30, 8, CombinedMargin.arcface(), sample_rate=0.3, vpl=VPLConfig(start_iter=0))
    head.train()
    head(*_batch(0))
    state = head.state_dict()
    head.eval()
    with torch.no_grad():
        head(*_batch(1))
    assert head.iteration == state["iteration"] == 1
    assert head.last_sampled_classes.numel() == 30
    assert torch.equal(head.vpl_memory, state["rows"]["vpl_memory"])
    assert torch.equal(head.sampler.state(), state["sampler_rng"])


def test_sampling_is_reproducible_from_the_checkpointed_rng_state() -> None:
    """Restoring a state replays the same samples; the initial shard does not depend on world size."""
    head = PartialFC(30, 8, CombinedMargin.cosface(), sample_rate=0.3, seed=7)
    head(*_batch(0))
    state = head.state_dict()
    head(*_batch(1))
    first = head.last_sampled_classes.clone()
    other = PartialFC(30, 8, CombinedMargin.cosface(), sample_rate=0.3, seed=7)
    other.load_state_dict(state)
    other(*_batch(1))
    assert torch.equal(other.last_sampled_classes, first)
    assert torch.equal(other.weight, head.weight)


def test_scale_backbone_grad_is_identity_forward_and_scales_backward() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_backbone_grad(x, 4.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3, 4), 4.0))
