"""``fr_pack`` at scale: what the packer holds grows with the identities, not with the images (issue
"Datasets at WebFace42M scale", item 3; the speed and the MXNet baseline are benchmarks/pack_scale.py)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_pipeline import pack
from data_pipeline.dataset import open_dataset
from data_pipeline.pack import PackOptions, main, pack_folders, verify_dataset
from tests.rec_fixtures import identity_folders, jpeg_bytes

_JPEGS = [jpeg_bytes(seed) for seed in range(4)]


def _tree(root: Path, images: int, per_identity: int = 5) -> Path:
    for i in range(images):
        folder = root / f"id_{i // per_identity:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(_JPEGS[i % len(_JPEGS)])
    return root


def _traced_peak(src: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        pack_folders(src, out, PackOptions(image_size=(16, 16), workers=1, progress=False))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_packing_holds_nothing_per_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python allocations while packing (reading, writing, identities.txt; the DALI index, a separate
    numpy pass, is left out): measured 4 B per image added (the writer's key array, 8 B per image,
    growing by halves), against 440 B with the list of every file the packer used to build — 18 GB
    at WebFace42M's 42.5M images."""
    monkeypatch.setattr(pack, "_prepare_dali_index", lambda out_dir: None)
    small, large = 500, 2500
    peaks = [_traced_peak(_tree(tmp_path / f"src{n}", n), tmp_path / f"out{n}") for n in (small, large)]
    per_image = (peaks[1] - peaks[0]) / (large - small)
    assert per_image < 40, f"{per_image:.0f} B of Python allocations per image added"
    with open_dataset(tmp_path / f"out{large}") as dataset:
        assert len(dataset) == large and dataset.num_classes == large // 5


class _Pool:
    """apply_async run at once; counts the chunks submitted and not yet collected."""

    def __init__(self) -> None:
        self.pending = self.most = 0

    def apply_async(self, func: Any, args: tuple[Any, ...]) -> Any:
        self.pending += 1
        self.most = max(self.most, self.pending)
        pool, result = self, func(*args)

        class Result:
            def get(self) -> Any:
                pool.pending -= 1
                return result

        return Result()


def test_chunks_in_flight_are_bounded_and_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pack, "_load_task", lambda task: (task[0], task[1].encode()))
    tasks: Iterator[Any] = ((i, f"img{i}", None, None) for i in range(1000))
    pool = _Pool()
    loaded = list(pack._bounded_imap(pool, pack._chunks(tasks, 7), window=3))  # type: ignore[arg-type]
    assert loaded == [(i, f"img{i}".encode()) for i in range(1000)]
    assert pool.most == 3 and pool.pending == 0


def test_a_folder_that_changes_while_packing_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Each identity folder is listed twice (checked, then packed); an image added in between is an
    error naming the folder, and no dataset is left behind."""
    src = identity_folders(tmp_path / "src", [2, 3])
    real = pack.scan_identity_folders

    def scan_then_add(src_dir: Path, progress: bool = False) -> pack.IdentityFolders:
        folders = real(src_dir, progress)
        (src_dir / "id_01" / "late.jpg").write_bytes(jpeg_bytes(9))
        return folders

    monkeypatch.setattr(pack, "scan_identity_folders", scan_then_add)
    out = tmp_path / "out"
    assert main([str(src), str(out), "--image-size", "16", "16", "--workers", "2", "--no-progress"]) == 1
    [message] = capsys.readouterr().err.splitlines()
    assert (f"{src / 'id_01'}: identity folder changed while packing: it holds 4 images now, 3 when SRC_DIR was "
            "listed" in message)
    assert not (out / "train.rec").exists()


def test_the_identity_scan_gives_the_order_the_streaming_pack_writes(tmp_path: Path) -> None:
    src = identity_folders(tmp_path / "src", [2, 1, 3])
    (src / "id_00" / ".hidden").write_bytes(b"x")
    folders = pack.scan_identity_folders(src)
    names, hidden = folders.names, folders.hidden
    tasks = [(label, src / name / file) for label, name in enumerate(names) for file in folders.files(label)]
    assert names == ["id_00", "id_01", "id_02"] and hidden == 1
    assert [label for label, _ in tasks] == [0, 0, 1, 2, 2, 2]
    assert pack_folders(src, tmp_path / "out", PackOptions(image_size=(16, 16), workers=2, progress=False))[
        "images"] == 6
    with open_dataset(tmp_path / "out") as dataset:
        assert [dataset.read_image(k)[1] for k in range(1, 7)] == [path.read_bytes() for _, path in tasks]
    assert verify_dataset(tmp_path / "out", workers=2)["images"] == 6


def test_more_records_than_float32_keys_hold_is_refused_before_any_image_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Identity records hold their key ranges as float32, exact up to 2**24: WebFace42M's 42.5M images
    cannot be one insightface dataset. The listing's counts say so at once (the writer would only
    find out at the first identity record, after reading every image)."""
    src = identity_folders(tmp_path / "src", [1, 1])
    real = pack.scan_identity_folders

    def huge(src_dir: Path, progress: bool = False) -> pack.IdentityFolders:
        listed = real(src_dir, progress)
        return pack.IdentityFolders(src_dir, listed.names, np.array([1 << 24, 5]), listed.hidden)

    monkeypatch.setattr(pack, "scan_identity_folders", huge)
    monkeypatch.setattr(pack, "_load_task", lambda task: pytest.fail("an image was read"))
    out = tmp_path / "out"
    assert main([str(src), str(out), "--image-size", "16", "16", "--workers", "1", "--no-progress"]) == 1
    [message] = capsys.readouterr().err.splitlines()
    assert (f"{src}: 16777221 images of 2 identities need record keys up to 16777224, but the insightface layout "
            "stores key ranges as float32 labels, exact only up to 16777216 (key 16777217 would be rounded)" in message)
    assert "at most 16777215 records" in message and not out.exists()
    pack.check_record_keys(src, pack.IdentityFolders(src, ["a", "b"], np.array([(1 << 24) - 4, 1]), 0))  # fits


def test_verify_reads_identity_ranges_that_mxnet_rounded_past_2_24() -> None:
    """Packs written with MXNet past 16.7M records (Glint360K: 17.1M images) hold float32-rounded
    identity keys; verify takes the boundary where the labels change within that rounding."""
    limit = 1 << 24
    first = limit + 11  # images are keys 1..first-1
    labels = np.zeros(first - 1, dtype=np.int8)
    labels[limit + 3 - 1:] = 1  # class 1 starts at key 2**24 + 3, odd: float32 stores 2**24 + 4
    stop_f = float(np.float32(limit + 3))
    assert stop_f == limit + 4
    assert pack._identity_stop(labels, 0, 1, stop_f, first) == limit + 3
    assert pack._identity_stop(labels, 1, limit + 3, float(np.float32(first)), first) == first
    assert pack._identity_stop(labels, 0, 1, 1000.0, first) == 1000  # exact keys are taken as they are
    labels[limit + 3 - 1:] = 0  # no change of label near the rounded key: the rounded key, refuted by the caller
    assert pack._identity_stop(labels, 0, 1, stop_f, first) == limit + 4
