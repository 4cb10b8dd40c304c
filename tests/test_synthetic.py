"""Specification of the synthetic-identity generator and the dataset it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import synthetic
from data_pipeline.binset import read_bin, write_bin
from data_pipeline.dataset import open_dataset
from data_pipeline.synthetic import (
    SyntheticConfig,
    build_verification_set,
    ensure_synthetic_dataset,
    identity_params,
    render_image,
    render_jpeg,
    verification_pairs,
    write_synthetic_dataset,
)
from fr_train.evaluation.baseline import raw_pixel_baseline

TINY = SyntheticConfig(num_identities=4, images_per_identity=3, holdout_identities=6,
                       holdout_images_per_identity=3, num_pairs=20, seed=7)


def test_images_are_rgb_uint8_of_the_configured_size() -> None:
    img = render_image(SyntheticConfig(image_size=96), 3, 1)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert img.std() > 10  # something is drawn


def test_same_seed_gives_identical_bytes_and_another_seed_different_ones() -> None:
    cfg = SyntheticConfig(seed=3)
    assert render_jpeg(cfg, 5, 2) == render_jpeg(SyntheticConfig(seed=3), 5, 2)
    assert render_jpeg(cfg, 5, 2) != render_jpeg(SyntheticConfig(seed=4), 5, 2)
    assert render_jpeg(cfg, 5, 2) != render_jpeg(cfg, 5, 3)
    assert identity_params(3, 5) == identity_params(3, 5) != identity_params(3, 6)


def test_difficulty_zero_removes_every_nuisance() -> None:
    """At difficulty 0 an identity's images are identical: the knob really scales the nuisances."""
    cfg = SyntheticConfig(difficulty=0.0)
    np.testing.assert_array_equal(render_image(cfg, 2, 0), render_image(cfg, 2, 9))
    assert not np.array_equal(render_image(cfg, 2, 0), render_image(cfg, 3, 0))


def test_pairs_are_balanced_distinct_and_drawn_from_held_out_identities() -> None:
    cfg = SyntheticConfig(num_identities=10, holdout_identities=8, holdout_images_per_identity=4, num_pairs=60)
    pairs, issame = verification_pairs(cfg)
    assert len(pairs) == 60 and issame.sum() == 30
    assert issame[0::2].all() and not issame[1::2].any()  # alternating: every contiguous fold is balanced
    assert len({frozenset([(a, i), (b, j)]) for a, i, b, j in pairs}) == 60
    for (a, i, b, j), same in zip(pairs, issame, strict=True):
        assert 10 <= a < 18 and 10 <= b < 18  # never a training identity
        assert (a == b) == same
        assert (a, i) != (b, j)


def test_written_dataset_reads_back_with_labels_pairs_and_metadata(tmp_path: Path) -> None:
    out = write_synthetic_dataset(tmp_path / "ds", TINY, workers=1)
    with open_dataset(out) as ds:
        assert ds.num_classes == 4 and len(ds) == 12
        assert ds.labels().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        label, jpeg = ds.read_image(int(ds.image_keys[4]))
        assert label == 1 and jpeg == render_jpeg(TINY, 1, 1)
    images, issame = read_bin(out / "synth_val.bin")
    assert len(images) == 40 and issame.sum() == 10
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["config"] == TINY.to_dict() and meta["config_hash"] == TINY.config_hash()
    assert meta["num_train_images"] == 12 and len(meta["fingerprint"]) == 64


def test_content_does_not_depend_on_the_number_of_worker_processes(tmp_path: Path) -> None:
    cfg = SyntheticConfig(num_identities=3, images_per_identity=2, holdout_identities=3,
                          holdout_images_per_identity=2, num_pairs=6)
    one = write_synthetic_dataset(tmp_path / "one", cfg, workers=1)
    two = write_synthetic_dataset(tmp_path / "two", cfg, workers=2)
    fingerprint = [json.loads((d / "synthetic.json").read_text())["fingerprint"] for d in (one, two)]
    assert fingerprint[0] == fingerprint[1]
    assert (one / "train.rec").read_bytes() == (two / "train.rec").read_bytes()


def test_cache_builds_once_and_keys_on_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_synthetic_dataset(tmp_path, TINY, workers=1)
    assert (first / "train.rec").is_file() and (first / "synth_val.bin").is_file()

    def must_not_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("cached dataset was rebuilt")

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", must_not_rebuild)
    assert ensure_synthetic_dataset(tmp_path, TINY, workers=1) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directories left
    with pytest.raises(AssertionError, match="rebuilt"):
        ensure_synthetic_dataset(tmp_path, SyntheticConfig(**{**TINY.to_dict(), "seed": 8}), workers=1)


def test_crashed_build_leaves_no_dataset_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out_dir: Path, cfg: SyntheticConfig, workers: int = 1) -> Path:
        (Path(out_dir) / "train.rec").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_synthetic_dataset(tmp_path, TINY, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_raw_pixels_cannot_verify_at_default_difficulty(tmp_path: Path) -> None:
    """Identity must not be readable from pixel correlation; the model has to learn structure."""
    cfg = SyntheticConfig(holdout_identities=50, num_pairs=400)  # default difficulty, fewer pairs: fast
    images, issame = build_verification_set(cfg, workers=1)
    assert len(images) == 800 and issame.mean() == 0.5
    result = raw_pixel_baseline(write_bin(tmp_path / "val.bin", images, issame))
    assert result.accuracy < 0.75


def test_raw_pixels_verify_perfectly_without_nuisances(tmp_path: Path) -> None:
    """The same measurement is not broken: with difficulty 0 genuine pairs are pixel-identical."""
    cfg = SyntheticConfig(difficulty=0.0, holdout_identities=10, holdout_images_per_identity=3, num_pairs=20)
    images, issame = build_verification_set(cfg, workers=1)
    assert raw_pixel_baseline(write_bin(tmp_path / "val.bin", images, issame)).accuracy == 1.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_pairs", 7, "must be even"),
        ("difficulty", 1.5, "difficulty"),
        ("holdout_images_per_identity", 1, "genuine pairs need two images"),
        ("num_pairs", 10_000, "distinct ones exist"),
        ("jpeg_quality_min", 99, "jpeg_quality_min"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**{field: value})
