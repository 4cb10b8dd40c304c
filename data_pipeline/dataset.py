"""A face-recognition RecordIO dataset folder: ``train.rec``, ``train.idx``, ``property``.

Two layouts exist in the wild and both are read:

* ``insightface``: record 0 is a header (flag 2, no image) with labels ``[a, b]``; keys ``1..a-1``
  are images labelled with their identity; keys ``a..b-1`` are identity records holding the
  ``[start, end)`` key range of each identity's images.
* ``im2rec``: every record is an image (keys may start at 0), labelled by its header.

Layout rule (WHY so strict: insightface issue #2254 is a reader that assumed a header that was not
there and mislabelled everything). The layout is ``insightface`` iff key 0 is in the index and its
record has flag 2, *no image bytes*, and labels ``[a, b]`` that are whole numbers with
``1 <= a <= b`` and every key ``0..b-1`` indexed. A real image record always has image bytes, so an
im2rec file cannot match. A record 0 with flag 2 and no image whose labels do not fit is an error,
not a silent fallback. Anything else is ``im2rec``.

The ``property`` file (``num_classes,height,width``) is required for both layouts: the class
count decides the classifier's size and must not be guessed silently. ``fr_pack --write-property
DIR`` creates it for a dataset that lacks one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from data_pipeline.errors import data_error
from data_pipeline.recordio import IR_SIZE, RecordReader, class_label, unpack_record

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"
LAYOUTS = ("insightface", "im2rec")


@dataclass(frozen=True)
class Layout:
    """Which records of a ``.rec`` are images, as decided by :func:`detect_layout`."""

    kind: str  # 'insightface' | 'im2rec'
    image_keys: np.ndarray  # int64, in the order training should see them (a read-only view of the index)
    identity_range: tuple[int, int] | None  # insightface: [first_identity_record, end)


def detect_layout(reader: RecordReader) -> Layout:
    """Apply the module's layout rule to an indexed reader. O(1) in the number of records: the image
    keys are a view of the index's memory-mapped arrays, not a copy."""
    if 0 not in reader:
        return Layout("im2rec", reader.keys, None)
    where = f"key 0 (byte offset {reader.offset(0)})"
    header, image = unpack_record(reader.read(0), path=reader.rec_path, where=where)
    if header.flag != 2 or image:
        return Layout("im2rec", reader.keys, None)
    a_f, b_f = header.label  # type: ignore[misc]
    shape_ok = a_f == int(a_f) and b_f == int(b_f) and 1 <= a_f <= b_f
    a, b = (int(a_f), int(b_f)) if shape_ok else (0, 0)
    if not shape_ok:
        raise data_error(
            reader.rec_path, where,
            f"record 0 looks like an insightface header (flag 2, no image) but its labels [{a_f}, {b_f}] are not "
            "whole numbers 1 <= first_identity_record <= end",
            "The header is corrupt; re-pack the dataset with fr_pack",
        )
    sorted_keys = reader.sorted_keys
    if not reader.lists_all_keys_below(b):
        gaps = np.flatnonzero(sorted_keys[:b] != np.arange(min(b, len(sorted_keys))))
        missing = int(gaps[0]) if gaps.size else len(sorted_keys)  # the first absent key
        raise data_error(
            reader.idx_path or reader.rec_path, f"key {missing}",
            f"key {missing} is missing: the insightface header (record 0 of {reader.rec_path.name}) says keys "
            f"0..{b - 1} exist ({b - a} identity records from key {a})",
            "The index is incomplete or belongs to another .rec; re-pack the dataset with fr_pack",
        )
    return Layout("insightface", sorted_keys[1:a], (a, b))  # keys 1..a-1, proven present


def read_property(path: Path) -> tuple[int, tuple[int, int]]:
    """``(num_classes, (height, width))`` from a property file ``num_classes,height,width``."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise data_error(
            path, "", "property file not found; it holds 'num_classes,height,width' (e.g. '93431,112,112')",
            f"Create it with `fr_pack --write-property {path.parent}` (counts the classes from the labels) "
            "or write it by hand",
        ) from None
    except UnicodeDecodeError:
        raise data_error(path, "", "property file is not ASCII text", "It must read 'num_classes,height,width'") from None
    fields = [f.strip() for f in text.split(",")]
    if len(fields) != 3 or not all(f.isdigit() for f in fields) or min(int(f) for f in fields) < 1:
        raise data_error(path, "line 1", f"expected 'num_classes,height,width' (three positive integers), got {text!r}",
                         "Fix the file, e.g. '93431,112,112'")
    num_classes, height, width = (int(f) for f in fields)
    return num_classes, (height, width)


class FaceRecordDataset:
    """Random access to the images and integer labels of one dataset folder.

    ``label(key)`` and ``read_image(key)`` validate the record they touch (an image key of this
    layout, a whole-number label in ``0..num_classes-1``) and raise DataFormatError naming the
    file, key and byte offset otherwise.
    """

    def __init__(self, directory: Path, reader: RecordReader, layout: Layout, num_classes: int,
                 image_size: tuple[int, int]) -> None:
        self.directory = directory
        self.reader = reader
        self.rec_path = reader.rec_path
        self.idx_path = reader.idx_path
        self.property_path = directory / PROPERTY_NAME
        self.layout = layout.kind
        self.identity_range = layout.identity_range
        self.num_classes = num_classes
        self.image_size = image_size  # (height, width)
        keys = layout.image_keys.view()
        keys.flags.writeable = False
        self.image_keys = keys
        self._contiguous = layout.identity_range is not None

    def __len__(self) -> int:
        return len(self.image_keys)

    def is_image_key(self, key: int) -> bool:
        if self._contiguous:
            return 1 <= key < self.identity_range[0]  # type: ignore[index]
        return key in self.reader

    def _where(self, key: int) -> str:
        return f"key {key} (byte offset {self.reader.offset(key)})"

    def read_image(self, key: int) -> tuple[int, bytes]:
        """``(class label, encoded image bytes)`` of image record ``key``."""
        key = int(key)
        if not self.is_image_key(key):
            raise KeyError(f"{self.rec_path}: key {key} is not an image record of this {self.layout} dataset")
        where = self._where(key)
        header, image = unpack_record(self.reader.read(key), path=self.rec_path, where=where)
        return self._checked_label(class_label(header, path=self.rec_path, where=where), where), image

    def first_image_size(self) -> tuple[int, int] | None:
        """(height, width) of the first image record, from its header alone (PIL reads no pixels);
        None when the dataset has no image or its first image's header cannot be read."""
        import io

        from PIL import Image, UnidentifiedImageError

        if not len(self.image_keys):
            return None
        try:
            with Image.open(io.BytesIO(self.read_image(int(self.image_keys[0]))[1])) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError):
            return None
        return int(height), int(width)

    def label(self, key: int) -> int:
        """Class label of image record ``key`` (reads only the record's header)."""
        key = int(key)
        if not self.is_image_key(key):
            raise KeyError(f"{self.rec_path}: key {key} is not an image record of this {self.layout} dataset")
        where = self._where(key)
        head = self.reader.read_prefix(key, IR_SIZE)
        if len(head) == IR_SIZE and head[:4] != b"\x00\x00\x00\x00":  # multi-label: fetch the label floats too
            flag = int.from_bytes(head[:4], "little")
            head = self.reader.read_prefix(key, IR_SIZE + 4 * flag)
        header, _ = unpack_record(head, path=self.rec_path, where=where)
        return self._checked_label(class_label(header, path=self.rec_path, where=where), where)

    def labels(self) -> np.ndarray:
        """Class labels of all image records, aligned with ``image_keys`` (int64)."""
        return np.fromiter((self.label(int(k)) for k in self.image_keys), dtype=np.int64, count=len(self.image_keys))

    def _checked_label(self, label: int, where: str) -> int:
        if label >= self.num_classes:
            raise data_error(self.rec_path, where, f"label {label} is not below num_classes={self.num_classes} "
                             f"from {self.property_path}", "Fix the property file's class count or re-pack the dataset")
        return label

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> FaceRecordDataset:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_dataset(directory: str | Path) -> FaceRecordDataset:
    """Open ``directory/{train.rec, train.idx, property}`` and detect its layout (see module doc).

    For the insightface layout the property's class count must equal the number of identity records.
    """
    directory = Path(directory)
    for name in (REC_NAME, IDX_NAME):
        if not (directory / name).is_file():
            raise data_error(directory / name, "", "file not found",
                             f"A dataset folder holds {REC_NAME}, {IDX_NAME} and {PROPERTY_NAME}; pack one with fr_pack")
    num_classes, image_size = read_property(directory / PROPERTY_NAME)
    reader = RecordReader(directory / REC_NAME, directory / IDX_NAME)
    try:
        layout = detect_layout(reader)
        if layout.identity_range is not None:
            first, end = layout.identity_range
            if end - first != num_classes:
                raise data_error(directory / PROPERTY_NAME, "line 1",
                                 f"num_classes={num_classes} but the insightface header (record 0) lists "
                                 f"{end - first} identity records (keys {first}..{end - 1})",
                                 "Fix the property file or re-pack the dataset")
    except BaseException:
        reader.close()
        raise
    return FaceRecordDataset(directory, reader, layout, num_classes, image_size)


def write_property(directory: str | Path, reader: RecordReader, layout: Layout) -> Path:
    """Create ``directory/property`` for a dataset that has none; returns its path.

    num_classes = number of identity records (insightface) or the largest image label + 1 (im2rec);
    the image size is that of the first image. Refuses to overwrite an existing property file.
    """
    from PIL import Image  # local: only this rarely used path needs an image decoder

    path = Path(directory) / PROPERTY_NAME
    if path.exists():
        raise data_error(path, "", "property file already exists", "Delete it first if it is wrong")
    if len(layout.image_keys) == 0:
        raise data_error(reader.rec_path, "", "no image records", "Nothing to describe; pack images first")
    labels = []
    for key in layout.image_keys:
        where = f"key {int(key)} (byte offset {reader.offset(int(key))})"
        header, _ = unpack_record(reader.read(int(key)), path=reader.rec_path, where=where)
        labels.append(class_label(header, path=reader.rec_path, where=where))
    if layout.identity_range is not None:
        num_classes = layout.identity_range[1] - layout.identity_range[0]
    else:
        num_classes = max(labels) + 1
    first = int(layout.image_keys[0])
    _, image = unpack_record(reader.read(first))
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            width, height = decoded.size
    except Exception as exc:  # PIL raises many types for garbage input
        raise data_error(reader.rec_path, f"key {first}", f"first image does not decode ({exc})",
                         "Fix or re-pack the dataset") from None
    path.write_text(f"{num_classes},{height},{width}\n", encoding="ascii")
    return path
