"""`eval.ijb=DIR`: a short real training run (benchmarks/methods.py's recipe, ArcFace) scores its final
model on an IJB release of identities it never saw, into train_log.jsonl, Prometheus's registry and the
run summary; and on that release the trained model beats an untrained one and raw pixels."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data_pipeline.synthetic import SyntheticConfig
from tests.distributed import run_distributed
from tests.ijb_release import write_ijb_release

STEPS = 60
# benchmarks/methods.py's recipe data: the release's subjects are its held-out identities
CFG = SyntheticConfig(num_identities=64, images_per_identity=16, holdout_identities=40, num_pairs=400, image_size=32)


def _train(rank: int, world: int, cache: str, storage: str, ijb: str) -> dict[str, Any]:
    from benchmarks.methods import recipe
    from cluster.launch import prepare_data
    from cluster.outcome import summarize_run
    from fr_train.config import build_config
    from fr_train.train.records import read_events
    from fr_train.train.trainer import Trainer

    args = argparse.Namespace(steps=STEPS, batch=64, lr=0.2, image_size=32, identities=64, cache=cache)
    cfg = build_config("mbf", "arcface", overrides=[*recipe(args, 0, Path(storage), "ijb"), f"eval.ijb={ijb}"])
    assert cfg.data.synthetic == CFG
    cfg.data.path = str(prepare_data(cfg))
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))
    trainer.fit()
    run_dir = Path(storage) / "ijb"
    registry = trainer.metrics.registry
    gauges = [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples
              if s.name in ("fr_train_eval_tar_at_far", "fr_train_eval_identification")]
    out = {"events": read_events(run_dir), "summary": summarize_run(run_dir), "gauges": gauges,
           "final": str(run_dir / "final")}
    # The release broken after the start check (an image gone): the finished run stays finished, the
    # error is recorded and summarised, nothing raises.
    sorted(Path(ijb, "loose_crop").iterdir())[0].unlink()
    out["after_damage"] = trainer._evaluate_ijb(trainer.engine.module)
    out["damage_events"] = read_events(run_dir)[len(out["events"]):]
    out["damage_summary"] = summarize_run(run_dir)
    return out


class RawPixels:
    """The floor: an image's mean-centred pixels as its embedding."""

    image_size, name, source = 32, "raw pixels", None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1).astype(np.float32)
        return x - x.mean(axis=1, keepdims=True)


def _figures(records: list[dict]) -> tuple[float, float, float]:
    one, many = records
    return one["tar_at_far_strict"]["0.1"], many["rank1"], many["rank5"]


@pytest.mark.slow
def test_a_run_scores_its_final_model_on_ijb_and_beats_untrained_and_raw_pixels(tmp_path: Path) -> None:
    from fr_train.backbones import build_backbone
    from fr_train.evaluation.embedders import TorchEmbedder, load_embedder
    from fr_train.evaluation.ijb import IJBOptions, evaluate_ijb

    release = write_ijb_release(tmp_path / "IJBC", CFG, subjects=40)
    (result,) = run_distributed(_train, 1, str(tmp_path / "cache"), str(tmp_path / "runs"), str(release.root),
                                timeout=900)
    ijb = [e for e in result["events"] if e.get("event") == "ijb"]
    end = result["events"][-1]
    assert [e["protocol"] for e in ijb] == ["1:1", "1:N"] and end["event"] == "end"
    assert [{k: v for k, v in e.items() if k not in ("event", "time", "step")} for e in ijb] == end["ijb"]
    assert "IJBC 1:1: TAR@FAR=1e-4" in result["summary"] and "IJBC 1:N: rank-1" in result["summary"]

    def gauge(name: str, **labels: str) -> list[float]:
        return [v for n, ls, v in result["gauges"] if n == name and labels.items() <= ls.items()]

    assert gauge("fr_train_eval_tar_at_far", set="IJBC", far="0.1") == [ijb[0]["tar_at_far"]["0.1"]]
    assert gauge("fr_train_eval_identification", set="IJBC", metric="rank1") == [ijb[1]["rank1"]]

    assert result["after_damage"] == [] and [e["event"] for e in result["damage_events"]] == ["ijb_error"]
    assert "listed in the tid/mid file but absent" in result["damage_events"][0]["error"]
    assert "IJB evaluation failed: DataFormatError" in result["damage_summary"]
    shutil.rmtree(release.root)
    release = write_ijb_release(tmp_path / "IJBC", CFG, subjects=40)  # whole again (deterministic)

    options = IJBOptions(threads=2, progress=False)
    trained = evaluate_ijb(load_embedder(result["final"], backbone=None, embedding_size=None, image_size=None,
                                         device=torch.device("cpu")), release.root, options=options)
    assert [{k: v for k, v in r.items() if k != "extract_s"} for r in trained] == \
        [{k: v for k, v in r.items() if k != "extract_s"} for r in end["ijb"]]  # fr_eval's numbers = the run's
    torch.manual_seed(0)
    untrained = evaluate_ijb(TorchEmbedder(build_backbone("mbf", image_size=32).eval(), torch.device("cpu"), 32),
                             release.root, options=options)
    raw = evaluate_ijb(RawPixels(), release.root, options=options)
    figures = {name: _figures(r) for name, r in (("trained", trained), ("untrained", untrained), ("raw", raw))}
    print(f"\nIJB (TAR@FAR=0.1 strict, rank-1, rank-5): {figures}")
    # 60 steps of a 32×32 mbf (synth_val 0.63 -> 0.78): a weak model, but ahead on every figure by more
    # than 0.05 (~10 of the ~190 genuine pairs, ~5 of the ~100 probes); 2026-12-04 measured +0.08..+0.11.
    for other in ("untrained", "raw"):
        for k in range(3):
            assert figures["trained"][k] > figures[other][k] + 0.05, figures
