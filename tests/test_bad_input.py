"""Broken datasets are refused with a message naming the file, the key or byte offset, and the problem.

Each case damages a valid dataset in one way and checks both the library error and, where it is
a dataset-level problem, ``fr_pack --verify`` (exit 1, the same message on stderr).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_pipeline.dataset import open_dataset
from data_pipeline.errors import DataFormatError
from data_pipeline.pack import main
from data_pipeline.recordio import MAGIC, IRHeader, RecordReader, RecordWriter, pack_record
from tests.rec_fixtures import insightface_dataset, jpeg_bytes

MAGIC_BYTES = MAGIC.to_bytes(4, "little")


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """insightface layout: header 0, images 1..4 (classes 0,0,1,1), identity records 5, 6."""
    insightface_dataset(tmp_path, [2, 2])
    return tmp_path


def offsets(directory: Path) -> dict[int, int]:
    lines = (directory / "train.idx").read_text().split()
    return {int(k): int(o) for k, o in zip(lines[::2], lines[1::2], strict=True)}


def set_idx(directory: Path, entries: list[tuple[int, int]]) -> None:
    (directory / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries))


def verify_fails(directory: Path, capsys: pytest.CaptureFixture) -> str:
    """Run ``fr_pack --verify --json``; it must exit 1 and end with a JSON line saying so. Returns stderr."""
    assert main(["--verify", str(directory), "--json", "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith('{"ok": false')
    return captured.err


def write_im2rec(directory: Path, images: list[tuple[float, bytes]], num_classes: int) -> dict[int, int]:
    """im2rec layout with keys 0..; returns key → offset."""
    directory.mkdir(parents=True, exist_ok=True)
    with RecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        where = {k: writer.write(k, pack_record(IRHeader(0, label, k, 0), image)) for k, (label, image) in
                 enumerate(images)}
    (directory / "property").write_text(f"{num_classes},16,16")
    return where


# ------------------------------------------------------------------------------------------------
# The .rec itself
# ------------------------------------------------------------------------------------------------
def test_bad_magic_names_the_rec_and_the_offset(dataset_dir: Path, capsys: pytest.CaptureFixture) -> None:
    off = offsets(dataset_dir)[3]
    data = bytearray((dataset_dir / "train.rec").read_bytes())
    data[off:off + 4] = b"XXXX"
    (dataset_dir / "train.rec").write_bytes(bytes(data))
    with open_dataset(dataset_dir) as dataset, pytest.raises(DataFormatError) as info:
        dataset.read_image(3)
    assert re.search(rf"train\.rec: key 3 \(byte offset {off} .*no record starts here: found 0x58585858", str(info.value))
    err = verify_fails(dataset_dir, capsys)
    assert f"train.rec: byte offset {off}: no record starts here" in err


@pytest.mark.parametrize(("cut", "problem"), [(3, "declares 32 payload bytes"), (36, "record header at byte offset")])
def test_truncated_last_record_names_its_offset(dataset_dir: Path, capsys: pytest.CaptureFixture, cut: int,
                                                problem: str) -> None:
    """Cut inside the last record's payload, or inside its 8-byte part header."""
    last = offsets(dataset_dir)[6]
    rec = dataset_dir / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-cut])
    err = verify_fails(dataset_dir, capsys)
    assert f"train.rec: byte offset {last}:" in err and problem in err and "truncated" in err


# ------------------------------------------------------------------------------------------------
# The .idx against the .rec
# ------------------------------------------------------------------------------------------------
def test_index_offset_past_end_of_file(dataset_dir: Path, capsys: pytest.CaptureFixture) -> None:
    entries = sorted(offsets(dataset_dir).items())
    entries[2] = (2, 10**9)
    set_idx(dataset_dir, entries)
    with open_dataset(dataset_dir) as dataset, pytest.raises(DataFormatError, match=r"key 2 \(byte offset 1000000000 "
                                                                                    r".*past the end of train\.rec"):
        dataset.read_image(2)
    assert "key 2 (byte offset 1000000000" in verify_fails(dataset_dir, capsys)


@pytest.mark.parametrize(("shift", "problem"), [(2, "not on a record boundary (records start at multiples of 4)"),
                                                (8, "not on a record boundary: no record starts here")])
def test_index_offset_not_on_a_record_boundary(dataset_dir: Path, capsys: pytest.CaptureFixture, shift: int,
                                               problem: str) -> None:
    entries = sorted(offsets(dataset_dir).items())
    bad = entries[3][1] + shift
    entries[3] = (3, bad)
    set_idx(dataset_dir, entries)
    with open_dataset(dataset_dir) as dataset, pytest.raises(DataFormatError) as info:
        dataset.label(3)
    assert f"train.rec: key 3 (byte offset {bad} listed in" in str(info.value) and problem in str(info.value)
    err = verify_fails(dataset_dir, capsys)
    assert f"key 3 (byte offset {bad}" in err and problem in err


def test_index_offset_pointing_into_a_multi_part_record(tmp_path: Path) -> None:
    """An aligned magic word in a payload splits the record; its second part is not a record start."""
    rec, idx = tmp_path / "m.rec", tmp_path / "m.idx"
    with RecordWriter(rec, idx) as writer:
        writer.write(0, b"ABCD" + MAGIC_BYTES + b"EFGH")
        second = writer.write(1, b"plain")
    inner = 8 + 4  # header of the first part, then its 4 bytes: the second part starts here
    idx.write_text(f"0\t{inner}\n1\t{second}\n")
    with RecordReader(rec, idx) as reader, pytest.raises(DataFormatError) as info:
        reader.check_index()
    assert f"m.rec: key 0 (byte offset {inner} listed in" in str(info.value)
    assert "points inside a multi-part record (continuation flag 3)" in str(info.value)


def test_record_missing_from_the_index_insightface(dataset_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """insightface: the header promises keys 0..6, so a missing key is named at open."""
    set_idx(dataset_dir, [(k, o) for k, o in sorted(offsets(dataset_dir).items()) if k != 3])
    with pytest.raises(DataFormatError, match=r"train\.idx: key 3: key 3 is missing"):
        open_dataset(dataset_dir)
    assert "train.idx: key 3: key 3 is missing" in verify_fails(dataset_dir, capsys)


def test_record_missing_from_the_index_im2rec(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    where = write_im2rec(tmp_path, [(0.0, jpeg_bytes(0)), (1.0, jpeg_bytes(1)), (1.0, jpeg_bytes(2))], 2)
    set_idx(tmp_path, [(0, where[0]), (2, where[2])])
    err = verify_fails(tmp_path, capsys)
    assert f"train.rec: byte offset {where[1]}: record is not listed in" in err


def test_extra_index_key_pointing_at_an_indexed_record(dataset_dir: Path, capsys: pytest.CaptureFixture) -> None:
    entries = sorted(offsets(dataset_dir).items())
    set_idx(dataset_dir, [*entries, (99, entries[2][1])])
    err = verify_fails(dataset_dir, capsys)
    assert f"train.idx: keys 2 and 99: both point at the record at byte offset {entries[2][1]}" in err


def test_extra_index_key_past_the_insightface_end(dataset_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A record after the identity records is neither image nor identity: verify names it."""
    with RecordWriter(dataset_dir / "tail.rec") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 7, 0), jpeg_bytes(9)))
    rec = dataset_dir / "train.rec"
    end = rec.stat().st_size
    rec.write_bytes(rec.read_bytes() + (dataset_dir / "tail.rec").read_bytes())
    (dataset_dir / "tail.rec").unlink()
    set_idx(dataset_dir, [*sorted(offsets(dataset_dir).items()), (7, end)])
    assert f"train.rec: key 7 (byte offset {end}): record lies beyond the insightface header's end key 7" in \
        verify_fails(dataset_dir, capsys)


@pytest.mark.parametrize(("text", "where"), [("0\t0\n1\n", "line 2"), ("0\t0\nx\t8\n", "line 2"),
                                              ("0\t0\n\n1\t8\n", "line 2"), ("0\t0\n0\t8\n", "lines 1 and 2")])
def test_malformed_index_lines_are_named(dataset_dir: Path, text: str, where: str) -> None:
    (dataset_dir / "train.idx").write_text(text)
    with pytest.raises(DataFormatError, match=rf"train\.idx: {where}: "):
        open_dataset(dataset_dir)


# ------------------------------------------------------------------------------------------------
# Payloads and labels
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", [b"\xff\xd8\xff" + b"not a jpeg" * 5, b"GIF89a nonsense", b""])
def test_payload_that_is_not_an_image_fails_verify(tmp_path: Path, capsys: pytest.CaptureFixture, image: bytes) -> None:
    where = write_im2rec(tmp_path, [(0.0, jpeg_bytes(0)), (1.0, image)], 2)
    assert f"train.rec: key 1 (byte offset {where[1]}): payload is not a decodable image" in verify_fails(tmp_path, capsys)


def test_payload_shorter_than_irheader(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), jpeg_bytes(0)))
        off = writer.write(1, b"tiny")
    (tmp_path / "property").write_text("1,16,16")
    assert f"train.rec: key 1 (byte offset {off}): record payload has 4 bytes" in verify_fails(tmp_path, capsys)


def test_label_not_below_num_classes_from_property(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    where = write_im2rec(tmp_path, [(0.0, jpeg_bytes(0)), (1.0, jpeg_bytes(1)), (2.0, jpeg_bytes(2))], 2)
    with open_dataset(tmp_path) as dataset, pytest.raises(DataFormatError) as info:
        dataset.label(2)
    assert f"train.rec: key 2 (byte offset {where[2]}): label 2 is not below num_classes=2" in str(info.value)
    assert "property" in str(info.value)
    assert "label 2 is not below num_classes=2" in verify_fails(tmp_path, capsys)


@pytest.mark.parametrize("label", [-1.0, 1.5, float("nan")])
def test_label_that_is_not_a_class_index(tmp_path: Path, label: float) -> None:
    where = write_im2rec(tmp_path, [(label, jpeg_bytes(0))], 2)
    with open_dataset(tmp_path) as dataset, pytest.raises(DataFormatError,
                                                          match=rf"key 0 \(byte offset {where[0]}.*not a non-negative"):
        dataset.read_image(0)


def test_image_label_disagreeing_with_identity_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """insightface: the identity records say key 2 is class 0, the image header says 1."""
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(IRHeader(2, (4.0, 6.0), 0, 0)))
        for key, label in ((1, 0.0), (2, 1.0), (3, 1.0)):
            writer.write(key, pack_record(IRHeader(0, label, key, 0), jpeg_bytes(key)))
        writer.write(4, pack_record(IRHeader(2, (1.0, 3.0), 4, 0)))
        writer.write(5, pack_record(IRHeader(2, (3.0, 4.0), 5, 0)))
    (tmp_path / "property").write_text("2,16,16")
    err = verify_fails(tmp_path, capsys)
    assert "train.rec: key 2 (byte offset" in err and "image label 1 disagrees with identity record key 4" in err


def test_missing_property_says_how_to_create_it(dataset_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (dataset_dir / "property").unlink()
    with pytest.raises(DataFormatError) as info:
        open_dataset(dataset_dir)
    message = str(info.value)
    assert f"{dataset_dir / 'property'}: property file not found" in message
    assert f"fr_pack --write-property {dataset_dir}" in message
    assert "property file not found" in verify_fails(dataset_dir, capsys)


@pytest.mark.parametrize("case", ["raw image folders", "a .rec without its .idx", "an empty directory"])
def test_a_data_folder_that_is_not_a_packed_dataset_names_the_missing_file_and_fr_pack(tmp_path: Path,
                                                                                     case: str) -> None:
    """`--data` pointed at what a user has before packing (issue 26): one line naming the file."""
    data = tmp_path / "data"
    data.mkdir()
    missing = "train.rec"
    if case == "raw image folders":
        (data / "alice").mkdir()
        (data / "alice" / "1.jpg").write_bytes(jpeg_bytes(1))
    elif case == "a .rec without its .idx":
        insightface_dataset(data, [2, 2])
        (data / "train.idx").unlink()
        missing = "train.idx"
    with pytest.raises(DataFormatError) as err:
        open_dataset(data)
    assert str(err.value) == (f"{data / missing}: file not found. A dataset folder holds train.rec, train.idx and "
                              "property; pack one with fr_pack")
