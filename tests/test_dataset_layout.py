"""Dataset folders: layout detection (insightface vs im2rec), labels, property, and the library packer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.dataset import detect_layout, open_dataset, write_property
from data_pipeline.errors import DataFormatError
from data_pipeline.pack import write_insightface_dataset
from data_pipeline.recordio import IRHeader, RecordReader, RecordWriter, pack_record, unpack_record
from tests.rec_fixtures import insightface_dataset, jpeg_bytes


def write_im2rec(directory: Path, records: list[tuple[int, IRHeader, bytes]], property_text: str | None) -> Path:
    """An im2rec-style folder: every record an image, keys as given."""
    directory.mkdir(parents=True, exist_ok=True)
    with RecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        for key, header, image in records:
            writer.write(key, pack_record(header, image))
    if property_text is not None:
        (directory / "property").write_text(property_text)
    return directory


def test_write_insightface_dataset_produces_the_insightface_layout(tmp_path: Path) -> None:
    """Header [first_identity, end], images at keys 1.. with their labels, identity records [start, end)."""
    samples = insightface_dataset(tmp_path, [2, 1, 3])
    with open_dataset(tmp_path) as dataset:
        assert dataset.layout == "insightface" and dataset.identity_range == (7, 10)
        assert dataset.image_keys.tolist() == [1, 2, 3, 4, 5, 6] and len(dataset) == 6
        assert (dataset.num_classes, dataset.image_size) == (3, (16, 16))
        assert [dataset.read_image(k) for k in dataset.image_keys] == samples
        assert dataset.labels().dtype == np.int64 and dataset.labels().tolist() == [0, 0, 1, 2, 2, 2]
        reader = dataset.reader
        assert unpack_record(reader.read(0)) == (IRHeader(2, (7.0, 10.0), 0, 0), b"")
        assert [unpack_record(reader.read(k))[0].label for k in (7, 8, 9)] == [(1.0, 3.0), (3.0, 4.0), (4.0, 7.0)]
        assert unpack_record(reader.read(4))[0] == IRHeader(0, 2.0, 4, 0)
        assert reader.keys.tolist() == list(range(10))
    assert (tmp_path / "property").read_text() == "3,16,16\n"
    names = {p.name for p in tmp_path.iterdir()}
    assert {"property", "train.idx", "train.rec"} <= names and not any(n.endswith(".partial") for n in names)


def test_im2rec_file_without_header_is_not_mistaken_for_insightface(tmp_path: Path) -> None:
    """insightface #2254: record 0 is an image; even a flag-2 multi-label image is not a header."""
    records = [(0, IRHeader(2, (1.0, 3.0), 0, 0), jpeg_bytes(0)),  # header-shaped labels, but has an image
               (1, IRHeader(0, 0.0, 1, 0), jpeg_bytes(1)),
               (2, IRHeader(0, 2.0, 2, 0), jpeg_bytes(2))]
    write_im2rec(tmp_path, records, "3,16,16")
    with open_dataset(tmp_path) as dataset:
        assert dataset.layout == "im2rec"
        assert dataset.image_keys.tolist() == [0, 1, 2]
        assert dataset.labels().tolist() == [1, 0, 2]
        assert dataset.read_image(0) == (1, jpeg_bytes(0))


def test_im2rec_keys_follow_index_order_and_need_not_start_at_zero(tmp_path: Path) -> None:
    records = [(k, IRHeader(0, float(k % 2), k, 0), jpeg_bytes(k)) for k in (10, 4, 7)]
    write_im2rec(tmp_path, records, "2,16,16")
    with open_dataset(tmp_path) as dataset:
        assert dataset.layout == "im2rec" and dataset.image_keys.tolist() == [10, 4, 7]
        assert dataset.label(7) == 1
        with pytest.raises(KeyError, match="key 5"):
            dataset.label(5)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ((3.0, 9.0), r"train\.idx: key 2: key 2 is missing: the insightface header"),
        ((2.5, 9.0), r"train\.rec: key 0 .*looks like an insightface header .* not whole numbers"),
        ((0.0, 2.0), r"train\.rec: key 0 .*looks like an insightface header .* 1 <= first_identity_record"),
        ((2.0, 1.0), r"train\.rec: key 0 .*looks like an insightface header .* <= end"),
    ],
)
def test_header_shaped_record_zero_that_does_not_fit_is_an_error(
    tmp_path: Path, labels: tuple[float, float], message: str
) -> None:
    """flag 2 + no image is only an insightface header; if it does not fit, that is corruption, not im2rec."""
    records = [(0, IRHeader(2, labels, 0, 0), b""), (1, IRHeader(0, 0.0, 1, 0), jpeg_bytes(1))]
    write_im2rec(tmp_path, records, "1,16,16")
    with pytest.raises(DataFormatError, match=message):
        open_dataset(tmp_path)


def test_non_image_keys_of_insightface_layout_are_refused(tmp_path: Path) -> None:
    insightface_dataset(tmp_path, [1, 1])
    with open_dataset(tmp_path) as dataset:
        for key in (0, 3, 4):  # header and identity records
            with pytest.raises(KeyError, match=f"key {key} is not an image record"):
                dataset.read_image(key)


def test_property_class_count_must_match_identity_records(tmp_path: Path) -> None:
    insightface_dataset(tmp_path, [1, 2])
    (tmp_path / "property").write_text("5,16,16")
    with pytest.raises(DataFormatError, match=r"property: line 1: num_classes=5 .* 2 identity records"):
        open_dataset(tmp_path)


@pytest.mark.parametrize("text", ["", "5,112", "five,112,112", "0,112,112", "5,112,112,3"])
def test_malformed_property_names_the_file_and_the_expected_format(tmp_path: Path, text: str) -> None:
    insightface_dataset(tmp_path, [1])
    (tmp_path / "property").write_text(text)
    with pytest.raises(DataFormatError, match=r"property: line 1: expected 'num_classes,height,width'"):
        open_dataset(tmp_path)


def test_write_property_counts_classes_for_a_dataset_that_lacks_one(tmp_path: Path) -> None:
    """im2rec: max label + 1 and the first image's size; an existing property is never overwritten."""
    records = [(k, IRHeader(0, float(label), k, 0), jpeg_bytes(k, size=24)) for k, label in enumerate([0, 4, 2])]
    write_im2rec(tmp_path, records, None)
    with RecordReader(tmp_path / "train.rec", tmp_path / "train.idx") as reader:
        path = write_property(tmp_path, reader, detect_layout(reader))
        assert path.read_text() == "5,24,24\n"
        with pytest.raises(DataFormatError, match="already exists"):
            write_property(tmp_path, reader, detect_layout(reader))


# ------------------------------------------------------------------------------------------------
# write_insightface_dataset refuses what it cannot write faithfully
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "num_classes", "message"),
    [
        ([0, 1, 0], 2, "sorted by label: sample #2 has label 0 after label 1"),
        ([0, 1, 2], 2, "label 2 is outside 0..1"),
        ([0, 2], 3, "class 1 has no images"),
        ([0, 1], 3, "class 2 has no images"),
    ],
)
def test_write_insightface_dataset_rejects_bad_sample_streams(
    tmp_path: Path, labels: list[int], num_classes: int, message: str
) -> None:
    """Unsorted, out-of-range or missing classes raise, and no dataset files are left behind."""
    with pytest.raises(ValueError, match=message):
        write_insightface_dataset(tmp_path, [(label, jpeg_bytes(i)) for i, label in enumerate(labels)], num_classes)
    assert list(tmp_path.iterdir()) == []


def test_write_insightface_dataset_rejects_bytes_that_are_not_an_encoded_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sample #1 .*not encoded JPEG or PNG"):
        write_insightface_dataset(tmp_path, [(0, jpeg_bytes(0)), (0, b"raw pixels")], 1)
    assert list(tmp_path.iterdir()) == []


def test_write_insightface_dataset_accepts_a_generator_and_returns_the_directory(tmp_path: Path) -> None:
    out = write_insightface_dataset(tmp_path / "new", ((i // 2, jpeg_bytes(i)) for i in range(4)), 2, (16, 16))
    assert out == tmp_path / "new"
    with open_dataset(out) as dataset:
        assert dataset.labels().tolist() == [0, 0, 1, 1]
