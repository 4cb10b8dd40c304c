"""NVIDIA DALI input pipeline: one RecordIO shard per rank → decoded, flipped, normalised NCHW batches.

How DALI's ``fn.readers.mxnet`` uses an ``.idx`` (read from DALI's source,
``dali/operators/reader/loader/recordio_loader.h`` ``RecordIOLoader::ReadIndexFile`` and
``dali/operators/reader/parser/recordio_parser.h``; the tests check the behaviour on the
installed DALI):

* it reads ``key offset`` pairs, **ignores the key**, sorts the offsets and gives sample *i* the
  byte range ``[offset_i, offset_{i+1})``; the last sample runs to the end of the file(s). Ranges
  of size 0 (duplicate offsets) are dropped. So the order of the lines does not matter: DALI
  visits records in file order and shuffling is only its window shuffle (``random_shuffle`` with
  ``initial_fill``).
* the parser checks the magic, reads the ``lrecord`` of the first part and copies exactly its
  payload (re-joining the parts of a multi-part record, whose non-final parts it assumes are
  4-byte multiples, as dmlc writes them); the label is the IRHeader float (or, when flag > 0,
  the ``flag`` floats after it); bytes after the record inside the range are never looked at.

Consequences for the insightface layout (header record 0, images ``1..a-1``, identity records
after them): an index listing only the image offsets keeps record 0 out of every range (it lies
before the first listed offset). The identity records cannot be kept out of every range by an
index: ranges tile ``[first listed offset, EOF)``, so whatever follows the last image belongs to
the last image's range. They sit in that range's *tail*, behind a complete image record, where
the parser never looks; they never reach the decoder (insightface #2235 was identity records
listed as samples of their own). With the default memory map its pages are normally not even
read. This module therefore writes an image-only index against the original ``train.rec`` and
does not copy the ``.rec``; :func:`prepare_dali_index` proves, for every record, the conditions
this relies on.
"""

from __future__ import annotations

import json
import math
import re
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from data_pipeline.array_file import file_crc32, read_array_file, write_array_file
from data_pipeline.atomic import atomic_write_bytes
from data_pipeline.dataset import FaceRecordDataset, open_dataset
from data_pipeline.errors import DataFormatError, data_error
from data_pipeline.idx_text import write_index_text
from data_pipeline.index_cache import sort_order
from data_pipeline.recordio import IR_SIZE, MAGIC

if TYPE_CHECKING:
    import torch
    from nvidia.dali import Pipeline

IMAGE_INDEX_NAME = "train_images.idx"
META_NAME = "train_images.json"  # written last: its presence commits the other two files
ARRAYS_NAME = "train_images.arrays"  # data_pipeline/array_file.py: memory-mapped by every rank
_FORMAT = "fr_train.dali_index/3"  # 2: image signatures checked; 3: memory-mapped arrays, images by label
_STATE_FORMAT = "fr_train.dali_iterator/1"
_LENGTH_MASK = (1 << 29) - 1
_REPACK = "Re-pack the dataset with fr_pack (images first, then identity records)"
_SOURCE_RE = re.compile(r" at index (\d+)")


# ---------------------------------------------------------------------------------------------
# The image-only index
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DaliIndex:
    """The image-only view of a dataset that DALI reads, in DALI's sample order (ascending offset)."""

    index_path: Path  # the ``key\\toffset`` file passed to fn.readers.mxnet
    rec_path: Path
    keys: np.ndarray  # int64 record keys, sorted by offset
    offsets: np.ndarray  # int64 byte offsets, ascending
    labels: np.ndarray  # int64 class of each image, as DALI will parse it from the IRHeader
    num_classes: int
    image_size: tuple[int, int]  # (height, width) from the property file
    layout: str
    tail_bytes: int  # bytes after the last image record (identity records) inside its DALI range
    labels_sorted: bool  # file order is sorted by label: the window shuffle mixes few identities
    by_label: np.ndarray  # int64 positions of the images sorted by label (stable): class c's images are
    label_starts: np.ndarray  # by_label[label_starts[c]:label_starts[c + 1]]; int64 [num_classes + 1]

    def __len__(self) -> int:
        return len(self.offsets)

    def key_of_offset(self, offsets: np.ndarray) -> np.ndarray:
        """Record keys of DALI samples given their byte offsets (from DALI's ``source_info``)."""
        pos = np.searchsorted(self.offsets, offsets)
        pos = np.minimum(pos, len(self.offsets) - 1)
        if not np.array_equal(self.offsets[pos], offsets):
            bad = int(offsets[np.flatnonzero(self.offsets[pos] != offsets)[0]])
            raise RuntimeError(f"{self.rec_path}: DALI returned a sample at byte offset {bad}, which is not an image "
                               f"record of {self.index_path}; the reader and the index disagree")
        return self.keys[pos]


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _frame_ends(words: np.ndarray, offsets: np.ndarray, rec_path: Path, keys: np.ndarray) -> np.ndarray:
    """Byte offset just past each record (all parts and padding); offsets are validated record starts."""
    o4 = offsets // 4
    lrec = words[o4 + 1]
    cflag = lrec >> 29
    length = (lrec & _LENGTH_MASK).astype(np.int64)
    ends = offsets + 8 + ((length + 3) & ~3)
    for i in np.flatnonzero(cflag == 1):  # multi-part records are rare: walk their parts one by one
        pos = int(ends[i])
        while True:
            where = f"key {int(keys[i])} (byte offset {int(offsets[i])})"
            if pos + 8 > len(words) * 4 or int(words[pos // 4]) != MAGIC:
                raise data_error(rec_path, where, f"multi-part record has no continuation part at byte offset {pos}",
                                 _REPACK)
            part = int(words[pos // 4 + 1])
            flag, n = part >> 29, part & _LENGTH_MASK
            if flag not in (2, 3):
                raise data_error(rec_path, where, f"continuation part at byte offset {pos} has flag {flag}, "
                                 "expected 2 or 3", _REPACK)
            if flag == 2 and n % 4:
                # DALI's parser skips no padding after a non-final part (dmlc never writes such a part).
                raise data_error(rec_path, where, f"non-final part at byte offset {pos} has {n} bytes, not a multiple "
                                 "of 4; DALI's RecordIO parser would misread the record", _REPACK)
            pos += 8 + ((n + 3) & ~3)
            if flag == 3:
                break
        ends[i] = pos
    return ends


def _validate_records(rec_path: Path, size: int, words: np.ndarray, keys: np.ndarray, offsets: np.ndarray,
                      what: str) -> None:
    """Every offset must be the start of a complete single- or first-part record inside the file."""
    def fail(mask: np.ndarray, problem: str) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise data_error(rec_path, f"{what} key {int(keys[i])} (byte offset {int(offsets[i])})", problem, _REPACK)

    fail((offsets % 4 != 0) | (offsets < 0) | (offsets + 8 > size),
         "offset is not a 4-byte-aligned record start inside the file")
    o4 = offsets // 4
    fail(words[o4] != MAGIC, "no RecordIO magic at this offset")
    lrec = words[o4 + 1]
    fail((lrec >> 29) > 1, "offset points inside a multi-part record (continuation flag 2 or 3)")
    fail(offsets + 8 + (lrec & _LENGTH_MASK).astype(np.int64) > size, "record runs past the end of the file")


def _records_by_offset(ds: FaceRecordDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All indexed records sorted by byte offset: (keys, offsets, is_image)."""
    keys, offsets = np.asarray(ds.reader.keys), np.asarray(ds.reader.offsets)
    image_keys = np.asarray(ds.image_keys, dtype=np.int64)
    if len(image_keys) == 0:
        raise data_error(ds.rec_path, "", "dataset has no image records", "Pack images first (fr_pack)")
    sorted_keys = np.asarray(ds.reader.sorted_keys)
    is_image = np.zeros(len(keys), dtype=bool)
    # The layout takes its image keys from the index, so every one of them is found here.
    order = sort_order(keys)
    rows = np.searchsorted(sorted_keys, image_keys)
    is_image[rows if order is None else order[rows]] = True
    by_offset = sort_order(offsets)  # None for a packed file: no copies made
    if by_offset is not None:
        keys, offsets, is_image = keys[by_offset], offsets[by_offset], is_image[by_offset]
    dup = np.flatnonzero(offsets[1:] == offsets[:-1])
    if dup.size:
        a, b = int(keys[dup[0]]), int(keys[dup[0] + 1])
        raise data_error(ds.idx_path, f"keys {a} and {b}", f"both point at byte offset {int(offsets[dup[0]])}; "
                         "DALI would read that record once and silently drop the other key", _REPACK)
    return keys, offsets, is_image


def _check_tiling(rec_path: Path, size: int, words: np.ndarray, keys: np.ndarray, offsets: np.ndarray,
                  is_image: np.ndarray) -> tuple[int, int]:
    """DALI's ranges tile [first image, EOF): prove each range holds exactly one record, images first.

    Inputs start at the first image record. Returns (number of images, bytes after the last image).
    """
    _validate_records(rec_path, size, words, keys, offsets, "record")
    ends = _frame_ends(words, offsets, rec_path, keys)
    gap = np.flatnonzero(ends[:-1] != offsets[1:])
    if gap.size:
        i = int(gap[0])
        raise data_error(rec_path, f"key {int(keys[i])} (byte offset {int(offsets[i])})",
                         f"record ends at byte {int(ends[i])} but the next indexed record (key {int(keys[i + 1])}) "
                         f"starts at byte {int(offsets[i + 1])}; DALI would read the bytes in between as part of "
                         "this record", _REPACK)
    if int(ends[-1]) != size:
        raise data_error(rec_path, f"byte offset {int(ends[-1])}", f"{size - int(ends[-1])} bytes after the last "
                         "indexed record are not listed in the index", _REPACK)
    n_img = int(is_image.sum())
    if not is_image[:n_img].all():
        i = int(np.argmin(is_image[:n_img]))  # >= 1: the inputs start with an image
        prev = int(keys[i - 1])
        raise data_error(rec_path, f"key {int(keys[i])} (byte offset {int(offsets[i])})",
                         f"this non-image record lies between image records (after image key {prev}); DALI would "
                         f"read it as part of image key {prev}'s byte range", _REPACK)
    return n_img, size - int(ends[n_img - 1])


def _image_labels(ds: FaceRecordDataset, words: np.ndarray, keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The int64 class of each image record exactly as DALI's parser reads it, after checking the
    IRHeader is where that parser looks (first part) and that image bytes follow it."""
    rec_path = ds.rec_path

    def fail(mask: np.ndarray, problem: str, fix: str = _REPACK) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise data_error(rec_path, f"image key {int(keys[i])} (byte offset {int(offsets[i])})", problem, fix)

    o4 = offsets // 4
    lrec = words[o4 + 1]
    first_part = (lrec & _LENGTH_MASK).astype(np.int64)
    fail(first_part < IR_SIZE, f"first record part is shorter than the {IR_SIZE}-byte IRHeader")
    flag = words[o4 + 2].astype(np.int64)  # IRHeader <IfQQ at payload byte 0: flag, label, id, id2
    fail(first_part < IR_SIZE + 4 * flag, "the IRHeader's label floats run past the first record part")
    fail(((lrec >> 29) == 0) & (first_part <= IR_SIZE + 4 * flag), "image record holds no image bytes (only an "
         "IRHeader); DALI would hand an empty buffer to the decoder")
    floats = words.view("<f4")
    # flag 0: the header's float label (payload byte 4); flag n: the first of n floats after the header.
    raw = np.where(flag == 0, floats[o4 + 3], floats[np.minimum(o4 + 8, len(floats) - 1)])
    fail(~np.isfinite(raw) | (raw < 0) | (raw != np.floor(raw)), "label is not a non-negative whole number")
    labels = raw.astype(np.int64)
    fail(labels >= ds.num_classes, f"label is not below num_classes={ds.num_classes} ({ds.property_path})",
         "Fix the property file's class count or re-pack the dataset")
    return labels


# What a payload starts with, per format DALI decodes (PNM: "P1".."P6"; JPEG 2000: codestream or box).
_SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"\xff\x4f\xff\x51",
               b"\x00\x00\x00\x0cjP", *(b"P%d" % i for i in range(1, 7)))
_JPEG_TAIL = 32  # bytes searched for JPEG's end marker (writers may pad after it)
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: a PNG's last 8 bytes


def _check_image_bytes(rec_path: Path, words: np.ndarray, keys: np.ndarray, offsets: np.ndarray,
                      chunk: int = 1 << 20) -> None:
    """Each single-part image record's payload starts with an image signature, and a JPEG or PNG ends
    with its end marker. Catches truncated and overwritten records before a worker starts: DALI's
    decoder fails on them mid-epoch without naming the record. (Damage inside a JPEG's entropy data
    is concealed by every decoder, DALI's and PIL's alike; only ``fr_pack --verify`` finds what a full
    decode rejects.) Vectorised in chunks of ``chunk`` records (bounded memory at 42M images); the
    bytes read lie on the pages the record headers are on (a payload ends where the next record starts)."""
    data = words.view(np.uint8)
    last = len(data) - 1
    fix = "Run `fr_pack --verify` on the dataset to list what else is damaged, then re-pack it from the source images"
    for lo in range(0, len(offsets), chunk):
        off = offsets[lo:lo + chunk]
        o4 = off // 4
        lrec = words[o4 + 1]
        single = (lrec >> 29) == 0
        start = off + 8 + IR_SIZE + 4 * words[o4 + 2].astype(np.int64)
        end = off + 8 + (lrec & _LENGTH_MASK).astype(np.int64)  # one past the payload's last byte
        head = data[np.minimum(start[:, None] + np.arange(8), last)]
        known = np.zeros(len(off), dtype=bool)
        for sig in _SIGNATURES:
            known |= (end - start >= len(sig)) & np.all(head[:, :len(sig)] == np.frombuffer(sig, np.uint8), axis=1)
        tail = data[np.clip(end[:, None] - _JPEG_TAIL + np.arange(_JPEG_TAIL), 0, last)]
        jpeg = single & (head[:, 0] == 0xFF) & (head[:, 1] == 0xD8)
        png = single & np.all(head[:, :4] == np.frombuffer(b"\x89PNG", np.uint8), axis=1)
        has_eoi = ((tail[:, :-1] == 0xFF) & (tail[:, 1:] == 0xD9)).any(axis=1)
        has_iend = np.all(tail[:, -8:] == np.frombuffer(_PNG_END, np.uint8), axis=1)
        for bad, problem in (
                (single & ~known, "payload is not an image DALI decodes (it starts with bytes {first})"),
                ((jpeg & ~has_eoi) | (png & ~has_iend),
                 "payload of {size} bytes has no end marker: the image is truncated or overwritten")):
            if bad.any():
                i = int(np.argmax(bad))
                first = bytes(data[int(start[i]):int(min(start[i] + 8, end[i]))]).hex(" ") or "none"
                raise data_error(rec_path, f"image key {int(keys[lo + i])} (byte offset {int(off[i])})",
                                 problem.format(first=first, size=int(end[i] - start[i])), fix)


def _scan(dataset_dir: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """Validate what DALI will read and return (metadata, keys, offsets, labels) of the images by offset."""
    with open_dataset(dataset_dir) as ds:
        keys, offsets, is_image = _records_by_offset(ds)
        size = ds.reader.size
        # A read-only memory map: only the pages holding record heads are read from disk.
        words = (np.memmap(ds.rec_path, dtype="<u4", mode="r", shape=(size // 4,)) if size >= 4
                 else np.zeros(0, dtype="<u4"))
        first = int(np.argmax(is_image))  # records before it (insightface header) are outside every range
        n_img, tail = _check_tiling(ds.rec_path, size, words, keys[first:], offsets[first:], is_image[first:])
        keys, offsets = keys[first:first + n_img].copy(), offsets[first:first + n_img].copy()
        labels = _image_labels(ds, words, keys, offsets)
        _check_image_bytes(ds.rec_path, words, keys, offsets)
        del words
        meta = {
            "format": _FORMAT,
            "rec": _stat(ds.rec_path),
            "idx": _stat(ds.idx_path),
            "property": _stat(ds.property_path),
            "layout": ds.layout,
            "num_images": n_img,
            "num_classes": ds.num_classes,
            "image_size": list(ds.image_size),
            "tail_bytes": tail,
            "labels_sorted": bool(np.all(labels[1:] >= labels[:-1])),
        }
    return meta, keys, offsets, labels


def _load_fresh(dataset_dir: Path, out_dir: Path) -> DaliIndex | None:
    """The prepared index if its metadata still describes the dataset's current files and our outputs
    (the text index by size and CRC-32, the arrays by their own CRC-32s), else None."""
    try:
        meta = json.loads((out_dir / META_NAME).read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            return None
        for name, file in (("rec", "train.rec"), ("idx", "train.idx"), ("property", "property")):
            if meta[name] != _stat(dataset_dir / file):
                return None
        text = meta["outputs"][IMAGE_INDEX_NAME]
        if (out_dir / IMAGE_INDEX_NAME).stat().st_size != text["size"] or file_crc32(out_dir / IMAGE_INDEX_NAME) != text["crc32"]:
            return None
        found = read_array_file(out_dir / ARRAYS_NAME)
        if found is None or found[0] != {"format": _FORMAT, "id": meta["outputs"][ARRAYS_NAME]}:
            return None
        arrays = found[1]
        height, width = meta["image_size"]
        return DaliIndex(index_path=out_dir / IMAGE_INDEX_NAME, rec_path=dataset_dir / "train.rec", keys=arrays["keys"],
                         offsets=arrays["offsets"], labels=arrays["labels"], num_classes=int(meta["num_classes"]),
                         image_size=(int(height), int(width)), layout=str(meta["layout"]),
                         tail_bytes=int(meta["tail_bytes"]), labels_sorted=bool(meta["labels_sorted"]),
                         by_label=arrays["by_label"], label_starts=arrays["label_starts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_dali_index(dataset_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write (or reuse) ``train_images.idx``: the image records of ``dataset_dir``'s ``train.rec``.

    DALI reads it with the original ``train.rec``; see the module docstring for why the header and
    identity records then never reach the decoder and why the ``.rec`` is not rewritten. Before
    writing, every record from the first image to the end of the file is checked to be a complete,
    indexed RecordIO record with no unindexed bytes between records, images form one run with no
    other record among them, and each image's IRHeader (as DALI parses it) carries a whole-number
    label below ``num_classes`` and non-empty image bytes. Any violation is a DataFormatError that
    names the file, key and byte offset.

    The order of the lines does not matter to DALI (it sorts the offsets); they are written in file
    order. A shuffled epoch comes from DALI's window shuffle only, so a ``.rec`` sorted by identity
    gives batches of few identities unless ``initial_fill`` is large (see :class:`DaliConfig`).

    Idempotent and atomic: next to the index go ``train_images.arrays`` (keys, offsets, labels and the
    images grouped by label, memory-mapped by every rank: data_pipeline/array_file.py) and
    ``train_images.json`` (size and mtime of ``train.rec``/``train.idx``/``property``, size and
    CRC-32 of the text index, the arrays file's id), written last. A call whose stored stamps still match returns at once;
    otherwise everything is rebuilt under temporary names and renamed into place, so concurrent
    callers (several ranks) are safe. ``out_dir`` (default: the dataset folder) lets a read-only
    dataset keep its index elsewhere; use one ``out_dir`` per dataset.
    """
    dataset_dir = Path(dataset_dir)
    out_dir = Path(out_dir) if out_dir is not None else dataset_dir
    if _load_fresh(dataset_dir, out_dir) is not None:
        return out_dir / IMAGE_INDEX_NAME
    meta, keys, offsets, labels = _scan(dataset_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_outputs(out_dir, meta, keys, offsets, labels)
    except PermissionError as exc:
        raise PermissionError(f"{out_dir}: cannot write the DALI image index ({exc.strerror}); pass a writable "
                              "out_dir / index_dir for a read-only dataset") from exc
    return out_dir / IMAGE_INDEX_NAME


def group_by_label(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(by_label, label_starts)``: image positions sorted by label (stable) and, for each class ``c``,
    where its run starts, so class ``c``'s images are ``by_label[label_starts[c]:label_starts[c + 1]]``."""
    order = sort_order(labels)  # None when the file is sorted by label (insightface packs are)
    by_label = np.arange(len(labels), dtype=np.int64) if order is None else order
    label_starts = np.zeros(num_classes + 1, dtype=np.int64)
    np.cumsum(np.bincount(labels, minlength=num_classes), out=label_starts[1:])
    return by_label, label_starts


def _write_outputs(out_dir: Path, meta: dict[str, Any], keys: np.ndarray, offsets: np.ndarray,
                   labels: np.ndarray) -> None:
    """Index, then arrays, then the metadata that names both (the commit point)."""
    write_index_text(out_dir / IMAGE_INDEX_NAME, keys, offsets)
    by_label, label_starts = group_by_label(labels, int(meta["num_classes"]))
    arrays_id = uuid.uuid4().hex
    write_array_file(out_dir / ARRAYS_NAME, {"format": _FORMAT, "id": arrays_id},
                     {"keys": keys, "offsets": offsets, "labels": labels, "by_label": by_label,
                      "label_starts": label_starts})
    meta["outputs"] = {IMAGE_INDEX_NAME: {"size": (out_dir / IMAGE_INDEX_NAME).stat().st_size,
                                          "crc32": file_crc32(out_dir / IMAGE_INDEX_NAME)},
                       ARRAYS_NAME: arrays_id}
    atomic_write_bytes(out_dir / META_NAME, json.dumps(meta, indent=1).encode("utf-8"))


def indexed_image_count(dataset_dir: str | Path, out_dir: str | Path | None = None) -> int:
    """How many images the prepared index of ``dataset_dir`` holds (its metadata: no arrays loaded)."""
    out_dir = Path(out_dir) if out_dir is not None else Path(dataset_dir)
    return int(json.loads((out_dir / META_NAME).read_text(encoding="utf-8"))["num_images"])


def load_dali_index(dataset_dir: str | Path, out_dir: str | Path | None = None) -> DaliIndex:
    """Prepare (if needed) and load the image-only index of ``dataset_dir`` (arrays memory-mapped)."""
    dataset_dir = Path(dataset_dir)
    out_dir = Path(out_dir) if out_dir is not None else dataset_dir
    index = _load_fresh(dataset_dir, out_dir)
    if index is None:
        prepare_dali_index(dataset_dir, out_dir)
        index = _load_fresh(dataset_dir, out_dir)
    if index is None:  # rebuilt a moment ago: only a concurrent change of the dataset gets here
        raise RuntimeError(f"{out_dir / META_NAME}: the DALI index was rebuilt but does not match {dataset_dir} "
                           "now; is the dataset being rewritten while it is opened?")
    return index


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DaliConfig:
    """How one rank's DALI pipeline reads and augments.

    ``last_batch`` (no default: it decides which samples an epoch contains):

    * ``"drop"``: every rank yields ``floor(floor(N/W)/B)`` full batches per epoch, all real
      samples; the rest of the rank's shard is skipped (a different random subset each epoch
      when shuffling).
    * ``"pad"``: every rank yields ``ceil(ceil(N/W)/B)`` full batches; each batch comes with
      ``num_valid``: its first ``num_valid`` samples are real, the rest repeat the last real
      sample this rank returned (DALI's ``pad_last_batch``) and must be masked. ``num_valid``
      may be 0 for a rank whose shard is one sample shorter than the others'.

    ``initial_fill`` is DALI's shuffle window in samples. DALI reads records in file order, so for
    a ``.rec`` sorted by identity a batch mixes roughly ``initial_fill / images_per_identity``
    identities; raise it (memory cost is small with mmap) or pack the file in shuffled order.
    """

    batch_size: int
    last_batch: Literal["drop", "pad"]
    device: Literal["cpu", "gpu"] = "cpu"
    device_id: int | None = None  # CUDA device for "gpu" (the local rank); must be None for "cpu"
    num_threads: int = 2
    seed: int = 0  # base seed; each rank derives its own reader and augmentation seeds from it
    random_shuffle: bool = True
    initial_fill: int = 32768
    stick_to_shard: bool = False  # False: rank r reads shard (r + epoch) % W in epoch `epoch`
    flip: bool = True  # random horizontal flip with probability 0.5
    resize: bool = False  # resize decoded images to the property's size; False: a mismatch is an error
    dtype: Literal["float32", "float16"] = "float32"  # float16 only on "gpu"
    prefetch_queue_depth: int = 2
    read_ahead: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"DaliConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.last_batch not in ("drop", "pad"):
            raise ValueError(f"DaliConfig.last_batch must be 'drop' or 'pad', got {self.last_batch!r}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"DaliConfig.device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.device == "gpu" and self.device_id is None:
            raise ValueError("DaliConfig.device='gpu' needs device_id (the local CUDA device of this rank)")
        if self.device == "cpu" and self.device_id is not None:
            raise ValueError("DaliConfig.device='cpu' runs without a GPU: device_id must be None")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"DaliConfig.dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if self.dtype == "float16" and self.device != "gpu":
            raise ValueError("DaliConfig.dtype='float16' is only supported with device='gpu'")
        for name in ("num_threads", "initial_fill", "prefetch_queue_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"DaliConfig.{name} must be >= 1, got {getattr(self, name)}")


def _rank_seeds(seed: int, rank: int) -> tuple[int, int]:
    """(reader seed, pipeline seed) of one rank: distinct per rank, reproducible from the base seed."""
    a, b = np.random.SeedSequence([seed, rank]).generate_state(2)
    return int(a) & 0x7FFFFFFF, int(b) & 0x7FFFFFFF


def import_dali() -> Any:
    """``nvidia.dali``, or an ImportError that says what to install (the pipeline and the P×K
    sampler build their graphs from it)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ImportError("the DALI pipeline needs NVIDIA DALI: pip install 'fr_train[dali]' "
                          "(or nvidia-dali-cuda120 on CUDA 12)") from exc
    import nvidia.dali as dali

    return dali


def build_pipeline(index: DaliIndex, config: DaliConfig, *, shard_id: int, num_shards: int,
                   checkpoint: bytes | None = None) -> Pipeline:
    """The DALI graph of one rank; outputs ``(images, labels, source_info)``.

    reader (image-only index, shard ``shard_id`` of ``num_shards``, always ``pad_last_batch`` so
    epochs end on batch boundaries and all shards have the same batch count) → decode to RGB
    (``mixed`` on GPU) → optional resize → ``crop_mirror_normalize``: ``(x − 127.5) / 127.5``,
    mirrored where a fair coin says so, CHW. Labels: the first IRHeader label cast to int64
    (insightface #1437: float labels stall the loss). ``source_info`` ("<rec> at index <offset>")
    lets the iterator name each sample's record key. Checkpointing is always enabled;
    ``checkpoint`` (from ``Pipeline.checkpoint()``) restores the reader and random-op state.
    """
    dali = import_dali()
    fn, types = dali.fn, dali.types
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}")
    if len(index) < num_shards:
        raise ValueError(f"{index.index_path}: {len(index)} images cannot be split into {num_shards} shards")
    reader_seed, pipe_seed = _rank_seeds(config.seed, shard_id)
    pipe = dali.Pipeline(batch_size=config.batch_size, num_threads=config.num_threads, device_id=config.device_id,
                         seed=pipe_seed, prefetch_queue_depth=config.prefetch_queue_depth,
                         enable_checkpointing=True, checkpoint=checkpoint)
    height, width = index.image_size
    with pipe:
        encoded, labels = fn.readers.mxnet(
            path=[str(index.rec_path)], index_path=[str(index.index_path)], shard_id=shard_id,
            num_shards=num_shards, random_shuffle=config.random_shuffle, initial_fill=config.initial_fill,
            pad_last_batch=True, stick_to_shard=config.stick_to_shard, read_ahead=config.read_ahead,
            seed=reader_seed, name="reader")
        source_info = fn.get_property(encoded, key="source_info")
        images = fn.decoders.image(encoded, device="mixed" if config.device == "gpu" else "cpu",
                                   output_type=types.RGB)
        if config.resize:
            images = fn.resize(images, resize_x=width, resize_y=height)
        mirror = fn.random.coin_flip(probability=0.5) if config.flip else 0
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], output_layout="CHW",
            dtype=types.FLOAT16 if config.dtype == "float16" else types.FLOAT)
        labels = fn.cast(labels[0], dtype=types.INT64)
        pipe.set_outputs(images, labels, source_info)
    pipe.build()
    return pipe


# ---------------------------------------------------------------------------------------------
# The torch iterator
# ---------------------------------------------------------------------------------------------
class FaceBatch(NamedTuple):
    """One batch; always ``batch_size`` samples (never short, so a cross-rank gather never breaks)."""

    images: torch.Tensor  # [B, 3, H, W] float32 (float16 if configured), on the pipeline's device
    labels: torch.Tensor  # [B] int64, same device
    num_valid: int  # the first num_valid samples are real; the rest are padding ("pad" policy only)
    keys: torch.Tensor  # [B] int64 record keys of the samples (CPU), for tracing a sample to the .rec


class DaliFaceIterator:
    """Batches of one rank for ``torch``: ``for batch in it`` runs one epoch; the next ``for`` the next.

    ``len(it)`` is the number of batches per epoch, identical on every rank (see
    :class:`DaliConfig` for the ``drop``/``pad`` policies). ``epoch`` is the 0-based epoch of the
    batches being yielded. ``reset()`` abandons the rest of the current epoch (its batches are
    read and discarded, because DALI's reader only moves forward) and starts the next one; a
    ``for`` loop over an exhausted epoch resets by itself.

    ``state_dict()`` / ``load_state_dict()`` use DALI's own checkpointing (reader position,
    shuffle buffer RNG, epoch, coin-flip RNG): restoring in a new process with the same dataset,
    config, rank and world size replays exactly the batches (images, flips, labels, order) that
    would have followed. A different world size, rank, batch size or seed cannot be resumed
    mid-epoch and is refused with the fields that differ.
    """

    def __init__(self, dataset_dir: str | Path, config: DaliConfig, *, rank: int, world_size: int,
                 index_dir: str | Path | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.index = load_dali_index(dataset_dir, index_dir)
        n, w, b = len(self.index), world_size, config.batch_size
        if n < w:
            raise ValueError(f"{self.index.index_path}: {n} images cannot be split into {w} shards")
        # DALI's shard s holds samples [floor(n*s/w), floor(n*(s+1)/w)); with pad_last_batch every
        # shard is padded to ceil(n/w) samples and then to whole batches.
        self._dali_batches = math.ceil(math.ceil(n / w) / b)
        self._len = self._dali_batches if config.last_batch == "pad" else (n // w) // b
        if self._len == 0:
            raise ValueError(f"{self.index.index_path}: with last_batch='drop' each of {w} ranks has at least "
                             f"{n // w} images, fewer than batch_size={b}: an epoch would be empty. Use batch_size <= "
                             f"{n // w} or fewer ranks (fr_train: data.batch_size, --num-workers)")
        if self.index.labels_sorted and config.random_shuffle and config.initial_fill < math.ceil(n / w):
            warnings.warn(f"{self.index.rec_path} is sorted by label and DALI shuffles only inside a window of "
                          f"initial_fill={config.initial_fill} of the {math.ceil(n / w)} samples per shard: batches "
                          "will hold few identities. Raise initial_fill or pack the .rec in shuffled order.",
                          stacklevel=2)
        self.epoch = 0
        self._batch = 0  # batches yielded in this epoch
        self._dali_done = 0  # DALI batches consumed in this epoch (>= _batch with "drop")
        self._pipe = self._build(None)

    # -- construction --------------------------------------------------------------------------
    def _build(self, checkpoint: bytes | None) -> Pipeline:
        pipe = build_pipeline(self.index, self.config, shard_id=self.rank, num_shards=self.world_size,
                              checkpoint=checkpoint)
        meta = pipe.reader_meta("reader")
        if int(meta["epoch_size"]) != len(self.index):
            raise RuntimeError(f"{self.index.index_path}: DALI counts {meta['epoch_size']} samples but the index lists "
                               f"{len(self.index)}; the index and the reader disagree")
        return pipe

    def _shard_size(self) -> int:
        """Real samples this rank reads in the current epoch (DALI rotates shards unless stick_to_shard)."""
        n, w = len(self.index), self.world_size
        s = self.rank if self.config.stick_to_shard else (self.rank + self.epoch) % w
        return (n * (s + 1)) // w - (n * s) // w

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cuda", self.config.device_id) if self.config.device == "gpu" else torch.device("cpu")

    def __len__(self) -> int:
        return self._len

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[FaceBatch]:
        if self._batch == self._len:
            self.reset()
        return self

    def __next__(self) -> FaceBatch:
        if self._batch == self._len:
            self._drain()
            raise StopIteration
        outputs = self._run()
        num_valid = min(max(self._shard_size() - self._batch * self.config.batch_size, 0), self.config.batch_size)
        self._batch += 1
        return self._convert(outputs, num_valid)

    def reset(self) -> None:
        """Skip what is left of this epoch and start the next."""
        self._drain()
        self.epoch += 1
        self._batch = 0
        self._dali_done = 0

    def _drain(self) -> None:
        while self._dali_done < self._dali_batches:
            self._run()

    def _run(self) -> tuple[Any, Any, Any]:
        try:
            outputs = self._pipe.run()
        except RuntimeError as exc:
            raise self._decode_error(exc) from exc
        self._dali_done += 1
        return outputs

    def _decode_error(self, exc: RuntimeError) -> Exception:
        """DALI's errors (e.g. an undecodable image) do not say which record; say where to look."""
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"]
        cause = after[0] if after else (lines[0] if lines else type(exc).__name__)
        return RuntimeError(
            f"{self.index.rec_path}: the DALI pipeline of rank {self.rank} failed in epoch {self.epoch}, batch "
            f"{self._batch} ({cause}). DALI does not report which record; run `fr_pack --verify "
            f"{self.index.rec_path.parent}` to find the broken image, then replace it and re-pack. The iterator is "
            "unusable now.")

    def _source_offset(self, source_info: str) -> int:
        """Byte offset of a sample from DALI's source_info ("<rec path> at index <offset>")."""
        found = _SOURCE_RE.search(source_info)
        if found is None:
            raise RuntimeError(f"DALI source_info {source_info!r} does not name a byte offset; this DALI version "
                               "reports sample origins differently than data_pipeline.dali expects")
        return int(found.group(1))

    def _convert(self, outputs: tuple[Any, Any, Any], num_valid: int) -> FaceBatch:
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        images_tl, labels_tl, info_tl = outputs
        offsets = np.array([self._source_offset(bytes(np.asarray(info_tl[i])).decode(errors="replace"))
                            for i in range(len(info_tl))], dtype=np.int64)
        keys = self.index.key_of_offset(offsets)
        height, width = self.index.image_size
        for i, shape in enumerate(images_tl.shape()):
            if tuple(shape) != (3, height, width):
                raise data_error(self.index.rec_path, f"image key {int(keys[i])} (byte offset {int(offsets[i])})",
                                 f"decoded image is {shape[2]}x{shape[1]} (WxH) but the property file says "
                                 f"{width}x{height}", f"Re-pack the source images at {width}x{height} (fr_pack --image-size {height} {width} --resize), "
                                 "or correct the property file if its size is wrong")
        labels = np.asarray(labels_tl.as_tensor()).astype(np.int64, copy=False).reshape(-1)
        expected = self.index.labels[np.searchsorted(self.index.offsets, offsets)]
        if not np.array_equal(labels, expected):
            i = int(np.flatnonzero(labels != expected)[0])
            raise RuntimeError(f"{self.index.rec_path}: key {int(keys[i])}: DALI parsed label {int(labels[i])} but the "
                               f"record's IRHeader says {int(expected[i])}")
        device = self.device
        dtype = torch.float16 if self.config.dtype == "float16" else torch.float32
        images = torch.empty((len(keys), 3, height, width), dtype=dtype, device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(images_tl.as_tensor(), images, cuda_stream=stream)
        return FaceBatch(images=images, labels=torch.from_numpy(labels.copy()).to(device), num_valid=num_valid,
                         keys=torch.from_numpy(keys.copy()))

    # -- checkpoints ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What must match for a saved reader position to mean the same thing."""
        return {"rank": self.rank, "world_size": self.world_size, "num_images": len(self.index),
                "index_first_offset": int(self.index.offsets[0]), "index_last_offset": int(self.index.offsets[-1]),
                **{k: v for k, v in asdict(self.config).items()
                   if k in ("batch_size", "last_batch", "seed", "random_shuffle", "initial_fill", "stick_to_shard",
                            "flip")}}

    def state_dict(self) -> dict[str, Any]:
        """The reader position after the last yielded batch (plain types + bytes: torch.load(weights_only=True) safe)."""
        return {"format": _STATE_FORMAT, "epoch": self.epoch, "batch": self._batch, "dali_batches": self._dali_done,
                "dali_checkpoint": self._pipe.checkpoint(), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position: the next batches are exactly those that followed it."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a DaliFaceIterator state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the DALI reader mid-epoch: {detail}. Resume with the same dataset, "
                             "batch size, seed, rank and world size as the saved run (fr_train: the same --data, "
                             "data.batch_size, run.seed and --num-workers)")
        self._pipe = self._build(bytes(state["dali_checkpoint"]))
        self.epoch, self._batch, self._dali_done = int(state["epoch"]), int(state["batch"]), int(state["dali_batches"])


__all__ = [
    "IMAGE_INDEX_NAME",
    "DaliConfig",
    "DaliFaceIterator",
    "DaliIndex",
    "DataFormatError",
    "FaceBatch",
    "build_pipeline",
    "load_dali_index",
    "prepare_dali_index",
]
