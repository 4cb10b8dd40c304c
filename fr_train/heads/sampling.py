"""Partial-FC negative sampling of one rank's class shard, drawn on the shard's device.

Every positive class of the global batch that this rank owns is kept; uniformly random negatives
fill the rest up to ``max(#positives, ceil(sample_rate·num_local))``. Positives get a score above
any random score and the top-k of the scores is taken, so no CPU permutation is drawn per step.
The generator is seeded from ``(seed, rank)`` and its state is checkpointed.
"""

from __future__ import annotations

import math

import torch

_RANK_STRIDE = 1_000_003  # distinct, reproducible streams per rank


def sampler_seed(seed: int, rank: int) -> int:
    return (int(seed) + _RANK_STRIDE * int(rank)) % (2**63 - 1)


def num_sampled(num_positive: int, num_local: int, sample_rate: float) -> int:
    """``max(#positives, ceil(sample_rate·num_local))``, never more than the shard."""
    return min(num_local, max(num_positive, math.ceil(sample_rate * num_local)))


def _resolved(device: torch.device) -> torch.device:
    """``cuda`` → ``cuda:<current>``: a generator made for ``cuda`` and a tensor on ``cuda:0`` are on
    the same device although ``torch.device("cuda") != torch.device("cuda", 0)``."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class ClassSampler:
    """Draws the sampled local class rows of one step."""

    def __init__(self, num_local: int, sample_rate: float, seed: int, rank: int, device: torch.device) -> None:
        self.num_local = num_local
        self.sample_rate = sample_rate
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(device=_resolved(device))
        self.reseed(0)

    def reseed(self, iteration: int) -> None:
        """Deterministic stream for (seed, rank, iteration): used at start, after resharding (RNG
        streams cannot be split) and when the head moves to another device (CPU and CUDA generator
        states are not interchangeable)."""
        self.generator.manual_seed(sampler_seed(self.seed + 7919 * iteration, self.rank))

    def _on(self, device: torch.device, iteration: int) -> None:
        if _resolved(self.generator.device) != _resolved(device):
            self.generator = torch.Generator(device=_resolved(device))
            self.reseed(iteration)

    def sample(self, positives: torch.Tensor, iteration: int) -> torch.Tensor | None:
        """Sorted local row indices to use this step, or ``None`` for "all rows" (rate 1).

        ``positives``: unique local indices of the classes present in the global batch.
        """
        self._on(positives.device, iteration)
        if self.sample_rate >= 1.0:
            return None
        k = num_sampled(int(positives.numel()), self.num_local, self.sample_rate)
        if k == self.num_local:
            return None
        if k == positives.numel():
            return torch.sort(positives).values
        scores = torch.rand(self.num_local, generator=self.generator, device=positives.device)
        scores[positives] = 2.0  # above every uniform score: positives are always in the top-k
        index = torch.topk(scores, k, sorted=False).indices
        return torch.sort(index).values

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor | None, iteration: int) -> None:
        """Restore a checkpointed stream; ``None`` or a state of another device's generator reseeds."""
        if state is None or state.numel() != self.generator.get_state().numel():
            self.reseed(iteration)
        else:
            self.generator.set_state(state)
