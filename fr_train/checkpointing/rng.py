"""Capture and restore the global random streams of python, numpy and torch (CPU + CUDA).

Everything is stored as tensors and plain numbers so ``torch.load(weights_only=True)`` reads it:
python's Mersenne state (625 words < 2**32) and numpy's MT19937 keys become int64 tensors.
Streams owned by components (the head's negative sampler, DALI's augmentation) are saved by
those components' own state dicts.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

RNG_FORMAT = "fr_train.rng/1"


def capture_rng(cuda_devices: list[int] | None = None) -> dict[str, Any]:
    """The current global RNG states. ``cuda_devices``: which GPUs' generators to save; default the
    current device only when CUDA is initialised (capturing every GPU would create a CUDA context
    on each of them in every rank's process)."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if cuda_devices is None:
        cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "format": RNG_FORMAT,
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": {int(d): torch.cuda.get_rng_state(d) for d in cuda_devices},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` saved; CUDA states need the same device indices to exist."""
    if state.get("format") != RNG_FORMAT:
        raise ValueError(f"RNG state: field 'format' is {state.get('format')!r}, expected {RNG_FORMAT!r}")
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or {}
    if cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [d for d in cuda if d >= available]
        if missing:
            raise ValueError(f"RNG state: field 'cuda' holds generators of CUDA devices {missing}, this process "
                             f"sees {available} device(s); resume on the same local GPU layout or drop state['cuda']")
        for d, s in cuda.items():
            torch.cuda.set_rng_state(s, d)


class ProcessRng:
    """This process's random streams as a checkpoint state (per rank: meaningful only for the same
    rank of the same world size, so a re-split drops it and the Trainer reseeds)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)
