"""A seeded permutation of ``range(n)`` evaluated at any position, without materialising it.

WHY: an epoch's order was ``rng.permutation(n)``: 8 bytes per image per rank, and ~2 s of work at
42.5M images at the start of every epoch and on every resume mid-epoch (issue 23: nothing on the step
path may grow with the dataset). Here position ``i`` of the epoch maps to image ``π(i)`` in O(1) time
and memory, so a batch costs O(batch) and a seek costs nothing.

π is a balanced Feistel network on ``2h``-bit words (``4^h ≥ n``, the smallest such ``h``), made a
permutation of ``[0, n)`` by cycle walking: encrypt again while the value is ``≥ n`` (fewer than 4
encryptions on average, since ``4^h < 4n``). Each of the 6 rounds mixes the right half with a round
key through SplitMix64's finaliser. A Feistel network is a bijection for any round function, so π
visits every image exactly once per epoch whatever the keys; with 4 or more rounds of a good mixer
its orders are indistinguishable from random ones for training (Luby–Rackoff). The keys come from
``numpy.random.SeedSequence(seed_words)``, so an order is a pure function of its seed words, the
same on every rank, machine and numpy version.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of uint64 with full avalanche); wraps modulo 2^64."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class Shuffle:
    """``Shuffle(n, seed_words)(positions)``: the images at those positions of a seeded order of ``range(n)``."""

    def __init__(self, n: int, seed_words: Sequence[int]) -> None:
        if n < 1:
            raise ValueError(f"a shuffle needs at least one element, got n={n}")
        self.n = n
        self._half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per half: 4^half >= n
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = np.random.SeedSequence(list(seed_words)).generate_state(_ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h, mask = np.uint64(self._half), self._mask
        left, right = x >> h, x & mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """int64 images at ``positions`` (int array, each in ``[0, n)``)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= self.n):
            raise IndexError(f"shuffle positions must lie in [0, {self.n})")
        out = self._encrypt(pos.astype(np.uint64))
        outside = np.flatnonzero(out >= np.uint64(self.n))
        while outside.size:  # cycle walking: stays a bijection of [0, n)
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64)


__all__ = ["Shuffle"]
