"""Every method preset learns: a short run of the real training loop (DALI, DeepSpeed, the sharded
head or the global-batch loss, the P×K sampler for the pair losses) on the synthetic default
raises the held-out verification accuracy of identities it never saw, well above the raw-pixel
baseline of the same pairs. The recipe is benchmarks/methods.py's (same backbone, data, steps,
optimizer and seed for every preset; UNPG, the slowest learner, gets 100 steps instead of 60); distill's teacher is the ArcFace model trained first."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fr_train.config import METHODS
from tests.distributed import run_distributed

STEPS = 60
# UNPG learns slowest under this recipe (benchmarks/RESULTS.md "Methods": 0.65 ± 0.03 held-out accuracy
# at 60 steps over seeds 0-2, i.e. on the margins below, where a rounding-level change of the backbone's
# optimizer moved seed 0 from 0.68 to 0.66); at 100 steps seed 0 reaches 0.775 (2026-12-01, this VM).
STEPS_OF = {"unpg": 100}


def _recipe_args(cache: str) -> argparse.Namespace:
    return argparse.Namespace(steps=STEPS, batch=64, lr=0.2, image_size=32, identities=64, cache=cache,
                              backbone="mbf", teacher=None)


def _learn_presets(rank: int, world: int, methods: list[str], cache: str, storage: str) -> dict[str, dict]:
    from benchmarks.methods import run_one

    args = _recipe_args(cache)
    out = {}
    for method in methods:
        out[method] = run_one(method, 0, argparse.Namespace(**{**vars(args), "steps": STEPS_OF.get(method, STEPS)}),
                              Path(storage))
        if method == "arcface":  # distill's teacher, trained first in the same group
            args.teacher = str(Path(storage) / "arcface-s0" / "final")
    return out


@pytest.mark.slow
def test_every_method_preset_learns_on_the_synthetic_default(tmp_path_factory: pytest.TempPathFactory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fr_train.evaluation.baseline import raw_pixel_baseline

    # Two independent single-process groups side by side (each run is one process with one thread,
    # deterministic whatever runs beside it): the same results as one after the other, in about half
    # the time on a 2-core machine. arcface leads the group that trains distill (its teacher).
    others = [m for m in METHODS if m not in ("arcface", "distill")]
    # Balanced by measured cost (2026-12-04): 7 runs (distill also runs its teacher) beside 6 (UNPG: 100 steps).
    groups = [["arcface", "distill", *others[: len(others) // 2]], others[len(others) // 2:]]
    cache = str(tmp_path_factory.mktemp("learn_cache"))
    from benchmarks.methods import recipe
    from cluster.launch import prepare_data  # build the shared synthetic set once, before the groups race
    from fr_train.config import build_config

    prepare_data(build_config("mbf", "arcface", overrides=recipe(_recipe_args(cache), 0, Path(cache), "prepare")))
    storages = [str(tmp_path_factory.mktemp(f"learn_runs{i}")) for i in range(len(groups))]
    with ThreadPoolExecutor(len(groups)) as pool:
        parts = list(pool.map(lambda g, st: run_distributed(_learn_presets, 1, g, cache, st, timeout=1800)[0],
                              groups, storages))
    results = {m: r for part in parts for m, r in part.items()}
    baseline = raw_pixel_baseline(Path(results["arcface"]["data_dir"]) / "synth_val.bin").accuracy
    print(f"\nraw pixels {baseline:.4f}")
    for method, r in results.items():
        print(f"{method:12s} step 0 {r['accuracy_step0']:.4f} -> step {STEPS_OF.get(method, STEPS)} {r['accuracy']:.4f} "
              f"(TAR@1e-3 {r['tar_at_far_1e-3']:.4f}, loss {r['final_loss']:.3f}, {r['seconds']:.0f}s)")
    assert set(results) == set(METHODS)
    for method, r in results.items():
        assert r["accuracy"] > baseline + 0.10, (method, r["accuracy"], baseline)
        assert r["accuracy"] > r["accuracy_step0"] + 0.04, (method, r["accuracy_step0"], r["accuracy"])
