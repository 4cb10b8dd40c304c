"""``fr_pack``: image folders → insightface ``train.rec/.idx/property``, and ``fr_pack --verify``.

With ``--landmarks FILE`` the folders may hold raw photos instead of aligned crops: each photo is
warped onto the ArcFace crop by its five points (:mod:`data_pipeline.face_align`) while packing.

The library entry point :func:`write_insightface_dataset` is what the synthetic-identity generator
and the folder packer share, so every dataset this project writes has the same layout:
record 0 = header with labels ``[first_identity_record, end]``, images at keys ``1..``, then one
identity record per class holding the ``[start, end)`` key range of its images.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import io
import itertools
import json
import multiprocessing
import operator
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipeline.dataset import (
    IDX_NAME,
    PROPERTY_NAME,
    REC_NAME,
    FaceRecordDataset,
    detect_layout,
    open_dataset,
    write_property,
)
from data_pipeline.errors import DataFormatError, data_error
from data_pipeline.face_align import align_face, similarity_transform, template_for
from data_pipeline.five_points import FivePoints, read_five_points
from data_pipeline.recordio import (
    IRHeader,
    RecordReader,
    RecordWriter,
    encode_record,
    pack_record,
    unpack_record,
)

_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
#: Image formats the DALI decoders read; anything else PIL opens (GIF, ICO, ...) is refused.
_DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"})
_FLOAT32_EXACT_LIMIT = 1 << 24  # every integer up to 2**24 is exact in float32 (the label type)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _exact_float32(value: int, what: str) -> float:
    """Labels are float32 on disk; refuse integers float32 would round (above 2**24)."""
    if float(np.float32(value)) != value:
        raise ValueError(
            f"{what} {value} cannot be stored exactly as the float32 label MXNet RecordIO uses "
            f"(integers above {_FLOAT32_EXACT_LIMIT} are rounded); split the dataset into several .rec files"
        )
    return float(value)


def write_insightface_dataset(
    out_dir: str | Path,
    samples: Iterable[tuple[int, bytes]],
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``train.rec``, ``train.idx`` and ``property`` in the insightface layout; returns ``out_dir``.

    ``samples`` are ``(label, encoded JPEG/PNG bytes)`` sorted by label, every label in
    ``0..num_classes-1`` having at least one image (a class without images would be a dead
    prototype; that is refused rather than written). ``image_size`` is (height, width) and is only
    recorded in ``property``. Files are written under temporary names and renamed at the end, so an
    interrupted run never leaves a dataset that looks complete. Afterwards the DALI image-only index
    is prepared when ``data_pipeline.dali.prepare_dali_index`` exists.

    A dataset already in ``out_dir`` (any of the three files) is a FileExistsError unless
    ``overwrite``: a dataset can take days to pack, and a second call with the same path must not
    silently replace it.
    """
    out_dir = Path(out_dir)
    existing = [name for name in (REC_NAME, IDX_NAME, PROPERTY_NAME) if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds a dataset ({', '.join(existing)}); pass overwrite=True to "
                              "replace it, or write to a new directory")
    num_classes = operator.index(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    height, width = (operator.index(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be two positive integers (height, width), got {image_size!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {name: out_dir / name for name in (REC_NAME, IDX_NAME, PROPERTY_NAME)}
    temp = {name: out_dir / f".{name}.partial" for name in final}
    try:
        _write_records(temp[REC_NAME], temp[IDX_NAME], samples, num_classes)
        temp[PROPERTY_NAME].write_text(f"{num_classes},{height},{width}\n", encoding="ascii")
        for name, path in temp.items():
            os.replace(path, final[name])
    finally:
        for path in temp.values():
            path.unlink(missing_ok=True)
    _prepare_dali_index(out_dir)
    return out_dir


def _write_records(rec_path: Path, idx_path: Path, samples: Iterable[tuple[int, bytes]], num_classes: int) -> None:
    # The header's labels are only known at the end; write a same-sized placeholder and patch it.
    placeholder = pack_record(IRHeader(2, (0.0, 0.0), 0, 0))
    starts = np.full(num_classes + 1, -1, dtype=np.int64)
    with RecordWriter(rec_path, idx_path) as writer:
        writer.write(0, placeholder)
        key, previous = 1, -1
        for index, (label_in, image) in enumerate(samples):
            label = operator.index(label_in)
            if not 0 <= label < num_classes:
                raise ValueError(f"sample #{index}: label {label} is outside 0..{num_classes - 1} (num_classes={num_classes})")
            if label < previous:
                raise ValueError(f"samples must be sorted by label: sample #{index} has label {label} after label {previous}")
            if not isinstance(image, (bytes, bytearray, memoryview)) or not bytes(image[:8]).startswith(_IMAGE_SIGNATURES):
                raise ValueError(f"sample #{index} (label {label}): image is not encoded JPEG or PNG bytes")
            if label != previous:
                if label != previous + 1:
                    raise ValueError(f"class {previous + 1} has no images (sample #{index} jumps from label {previous} "
                                     f"to {label}); every class 0..num_classes-1 needs at least one image")
                starts[label] = key
                previous = label
            writer.write(key, pack_record(IRHeader(0, _exact_float32(label, "label"), key, 0), bytes(image)))
            key += 1
        if previous != num_classes - 1:
            raise ValueError(f"class {previous + 1} has no images: samples ended at label {previous} but "
                             f"num_classes={num_classes}; every class needs at least one image")
        first_identity = key
        starts[num_classes] = first_identity
        for c in range(num_classes):
            k = first_identity + c
            span = (_exact_float32(int(starts[c]), "record key"), _exact_float32(int(starts[c + 1]), "record key"))
            writer.write(k, pack_record(IRHeader(2, span, k, 0)))
        end = first_identity + num_classes
    header = pack_record(IRHeader(2, (_exact_float32(first_identity, "record key"), _exact_float32(end, "record key")),
                                  0, 0))
    encoded_old, encoded_new = encode_record(placeholder), encode_record(header)
    if len(encoded_new) != len(encoded_old):  # only if the header contained the magic word; labels >= 0 never do
        raise AssertionError("insightface header record changed size while patching")
    with open(rec_path, "r+b") as f:
        f.write(encoded_new)


def _prepare_dali_index(out_dir: Path) -> None:
    """Run ``data_pipeline.dali.prepare_dali_index(out_dir)`` if that module and function exist.

    Only their absence is tolerated; any error raised while importing or running them propagates.
    """
    try:
        module = importlib.import_module("data_pipeline.dali")
    except ModuleNotFoundError as exc:
        if exc.name != "data_pipeline.dali":
            raise
        return
    prepare = getattr(module, "prepare_dali_index", None)
    if prepare is not None:
        prepare(out_dir)


# ---------------------------------------------------------------------------------------------
# Packing image folders
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackOptions:
    """How ``fr_pack SRC OUT`` turns files into records."""

    image_size: tuple[int, int] = (112, 112)  # (height, width) every image must have
    resize: bool = False  # rescale images of another size instead of refusing them
    quality: int = 95  # JPEG quality when an image has to be re-encoded
    workers: int = 1
    progress: bool = True
    overwrite: bool = False  # replace the dataset of a non-empty OUT (fr_pack --overwrite)
    landmarks: Path | None = None  # five-point file of raw photos: align each onto the ArcFace crop

    def __post_init__(self) -> None:
        """Refuse option sets whose result would be ambiguous, before any file is touched: the ArcFace
        crop is square, and an aligned crop already has the pack's size, so --resize has nothing to do
        (accepting it silently would suggest it changed something)."""
        if self.landmarks is None:
            return
        height, width = self.image_size
        if height != width:
            raise ValueError(f"landmark alignment makes square crops; image_size must be square, got {height}x{width}")
        if self.resize:
            raise ValueError("resize does not apply with landmarks: each photo is aligned straight to image_size")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``, before any image is read. WHY any entry,
    not only a dataset: OUT is usually a typo'd or reused path, and what is in it (a dataset, its
    verification sets, someone's files) was not made by this command. ``--overwrite`` replaces only
    the files fr_pack writes (train.rec/.idx, property, identities.txt, the DALI index)."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory; choose another OUT_DIR")
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise FileExistsError(f"{out_dir}: output directory is not empty (holds {shown}); packing would replace "
                              "the dataset in it. Choose a new OUT_DIR, or pass --overwrite to replace its "
                              "train.rec/train.idx/property")


@dataclass(frozen=True)
class IdentityFolders:
    """What one listing of ``SRC/<identity>/<image>`` keeps: a name and an image count per identity.

    WHY not the file paths: a list of them (with the worker tasks made from it) was ~450 B of Python
    objects per image in the parent, 19 GB at WebFace42M's 42.5M images (tests/test_pack_scale.py),
    for a pack whose other state is O(identities). Each folder is listed again just
    before its images are read (:meth:`files`), which costs a directory read per identity.
    """

    src_dir: Path
    names: list[str]  # identity folder names in label order
    counts: np.ndarray  # int64, images of each identity
    hidden: int  # dot-files and dot-folders ignored

    @property
    def images(self) -> int:
        return int(self.counts.sum())

    def files(self, label: int) -> list[str]:
        """The image file names of identity ``label`` in sorted order, as the first listing found them;
        DataFormatError if the folder changed since (or holds a nested folder now)."""
        folder = self.src_dir / self.names[label]
        files, _ = _identity_files(folder)
        if len(files) != self.counts[label]:
            raise data_error(folder, "", f"identity folder changed while packing: it holds {len(files)} images "
                             f"now, {int(self.counts[label])} when SRC_DIR was listed",
                             "Do not add or remove images in SRC_DIR while fr_pack runs; pack again")
        return files

    def relative_names(self) -> Iterator[str]:
        """``IDENTITY/IMAGE`` of every image in pack order (the names a landmark file uses)."""
        for label, name in enumerate(self.names):
            for file in self.files(label):
                yield f"{name}/{file}"


def _identity_files(folder: Path) -> tuple[list[str], int]:
    """Sorted image file names of one identity folder and the hidden entries skipped. os.scandir:
    its entries know their type without a stat per file (one per image was most of a listing)."""
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    files: list[str] = []
    hidden = 0
    for item in entries:
        if item.name.startswith("."):
            hidden += 1
        elif item.is_file():  # follows symbolic links, as Path.is_file
            files.append(item.name)
        else:
            raise data_error(folder / item.name, "", "nested folder inside an identity folder",
                             "Identity folders must hold image files only")
    return files, hidden


def scan_identity_folders(src_dir: Path, progress: bool = False) -> IdentityFolders:
    """List and check ``src_dir`` once, keeping O(identities): names, image counts, hidden entries.

    Identities are the sub-folders of ``src_dir`` in sorted name order (label = position); files
    inside them in sorted order. Hidden entries (dot-files such as .DS_Store) are ignored and
    counted; anything else that is not an identity folder or a file inside one is an error, raised
    here, before anything is written.
    """
    if not src_dir.is_dir():
        raise data_error(src_dir, "", "source is not a directory", "Pass a folder holding one sub-folder per identity")
    names: list[str] = []
    counts: list[int] = []
    hidden = 0
    with os.scandir(src_dir) as scan:  # DirEntry: its type without a stat, and lighter than a Path
        entries = sorted(scan, key=lambda e: e.name)
    for item in tqdm(entries, unit="dir", desc="fr_pack: listing", disable=not progress, leave=False):
        entry = src_dir / item.name
        if item.name.startswith("."):
            hidden += 1
            continue
        if not item.is_dir():  # follows symbolic links, as Path.is_dir
            raise data_error(entry, "", "file at the top level of the source folder",
                             "Put every image inside its identity's folder (SRC/<identity>/<image>)")
        try:  # identities.txt is UTF-8: refuse a name it cannot hold before anything is written
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            shown = entry.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise data_error(entry.parent / shown, "", "identity folder name is not valid UTF-8",
                             "Rename the folder with a UTF-8 name") from None
        files, skipped = _identity_files(entry)
        hidden += skipped
        if not files:
            raise data_error(entry, "", "identity folder has no images", "Remove the empty folder or add its images")
        names.append(entry.name)
        counts.append(len(files))
    if not names:
        raise data_error(src_dir, "", "no identity folders found", "Pass a folder holding one sub-folder per identity")
    return IdentityFolders(src_dir, names, np.asarray(counts, dtype=np.int64), hidden)


_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # 16-bit grayscale as PIL opens it


def to_8_bits(image: Image.Image, path: Path) -> Image.Image:
    """A 16-bit grayscale image scaled to 8 bits (v / 257, rounded: 65535 → 255). PIL's own
    ``convert("RGB")`` clips such values at 255 instead, turning a 16-bit PNG near-white (issue 28:
    source mean 127.5, stored 254.4). 16-bit RGB PNGs PIL already opens as 8-bit ``RGB``. Floating-point
    images have no agreed range and are refused."""
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise data_error(path, "", f"{image.mode} image has values outside 0..65535", "Save it as 8- or 16-bit")
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise data_error(path, "", "floating-point image (PIL mode F): its value range is unknown",
                         "Convert it to an 8-bit JPEG or PNG first")
    return image


def load_face_image(path: Path, label: int, options: PackOptions,
                    landmarks: np.ndarray | None = None) -> tuple[int, bytes]:
    """Read, fully decode and size-check one image; returns (label, JPEG/PNG bytes to store).

    An RGB JPEG of the right size is stored byte for byte (no generation loss); anything else
    (PNG with alpha, grayscale, other formats, --resize) is re-encoded as RGB JPEG. With
    ``landmarks`` (5x2, x y in the stored pixels of the file, no EXIF rotation applied) the image
    may have any size: it is aligned onto the ArcFace crop and the crop is re-encoded the same way.
    """
    raw = path.read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if landmarks is not None:
                return label, _aligned_jpeg(image, path, landmarks, options)
            fmt, mode, size = image.format, image.mode, image.size
            height, width = options.image_size
            if size != (width, height):
                if not options.resize:
                    raise data_error(path, "", f"image is {size[0]}x{size[1]} (WxH), expected {width}x{height}",
                                     "Align and crop faces to the training size first, or pass --resize")
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            if fmt == "JPEG" and mode == "RGB" and size == (width, height):
                return label, raw
            buffer = io.BytesIO()
            to_8_bits(image, path).convert("RGB").save(buffer, format="JPEG", quality=options.quality)
            return label, buffer.getvalue()
    except DataFormatError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise data_error(path, "", f"not a readable image ({exc})", "Remove or replace the file") from None


def _aligned_jpeg(image: Image.Image, path: Path, landmarks: np.ndarray, options: PackOptions) -> bytes:
    """The ArcFace crop of a decoded photo, as RGB JPEG at ``options.quality`` (the quality every
    re-encoded image of the pack gets, so aligned and pre-cropped sources are stored alike).

    The landmarks were checked in the parent (:func:`match_landmarks`); turning a ValueError or
    cv2.error into DataFormatError here is only the backstop, so that whatever the warp still
    refuses ends the pack with the image's name rather than a worker's traceback.
    """
    pixels = np.asarray(to_8_bits(image, path).convert("RGB"))
    try:
        crop = align_face(pixels, landmarks, options.image_size[0])
    except (ValueError, cv2.error) as exc:
        raise data_error(path, "", f"cannot be aligned by its landmarks ({str(exc).strip()})",
                         "Fix or drop its line in the landmark file, or move the image out of SRC_DIR") from None
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=options.quality)
    return buffer.getvalue()


#: One worker task: (label, image path, options, the image's 5x2 landmarks or None). The points
#: travel with the task so that workers never read the landmark file (it can be a million lines).
_Task = tuple[int, str, PackOptions, np.ndarray | None]


def _load_task(task: _Task) -> tuple[int, bytes]:
    label, path, options, landmarks = task
    return load_face_image(Path(path), label, options, landmarks)


def _shown(name: str) -> str:
    """A file name as it can be printed: bytes that are not UTF-8 (surrogate escapes) as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _listing(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(_shown(n)) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def check_landmarks(src_dir: Path, relative: Iterable[str], landmarks: FivePoints, size: int) -> list[str]:
    """Warnings about ``landmarks`` for the images named ``relative``; DataFormatError if any is unusable.

    A file's name in the landmark file is its path relative to ``src_dir`` with ``/``. All of it is
    checked here, in the parent, before OUT is touched, so a bad file costs seconds rather than a
    pack interrupted hours in. Lines naming no file in ``src_dir`` are only a warning: landmark files
    are often made for a larger collection than the folders packed. ``relative`` is consumed once,
    in pack order; what is kept is O(landmark lines) (a flag per line), not O(images).
    """
    # A similarity needs points that do not all coincide. similarity_transform is the judge, but at
    # ~0.1 ms a call it would add minutes to a million-image pack; so only sets whose spread is
    # under one pixel (no real face) are handed to it, and its ValueError names the line.
    suspect: set[int] = set()
    step = 1 << 20  # rows at a time: the float64 temporaries of all 42.5M rows would be 3+ GB
    for lo in range(0, len(landmarks.points), step):
        points = landmarks.points[lo:lo + step]
        spread = ((points - points.mean(axis=1, keepdims=True)) ** 2).sum(axis=2).mean(axis=1)
        suspect.update((lo + np.flatnonzero(spread < 1.0)).tolist())
    template = template_for(size)
    used = np.zeros(len(landmarks.names), dtype=bool)
    missing: list[str] = []  # the first one only, and the count
    missing_count = 0
    degenerate: tuple[int, str, ValueError] | None = None  # the first, in pack order
    for name in relative:
        row = landmarks.row_of.get(name)
        if row is None:
            missing_count += 1
            if not missing:
                missing.append(name)
            continue
        used[row] = True
        if degenerate is None and row in suspect:
            try:
                similarity_transform(landmarks.points[row], template)
            except ValueError as exc:
                degenerate = (row, name, exc)
    unused_rows = np.flatnonzero(~used)
    unused = [landmarks.names[int(r)] for r in unused_rows[:4]]  # enough for _listing's "..."
    if missing:
        others = f" (nor for {missing_count - 1} other images of {src_dir})" if missing_count > 1 else ""
        hint = (f"; {unused_rows.size} of its names match no image there (e.g. {_listing(unused)}), so they may be "
                "relative to another folder than SRC_DIR" if unused_rows.size else "")
        raise data_error(landmarks.path, "", f"has no line for image {_shown(missing[0])!r}{others}{hint}",
                         "Add a line 'IDENTITY/IMAGE x1 y1 ... x5 y5' for every image (its path relative to "
                         "SRC_DIR, with '/'), or move the images without landmarks out of SRC_DIR")
    if degenerate is not None:
        row, name, exc = degenerate
        raise data_error(landmarks.path, f"line {landmarks.lines[row]}",
                         f"the landmarks of {_shown(name)!r} cannot align it ({exc})",
                         "Re-run the landmark detector on that image, or drop its line and move the image "
                         "out of SRC_DIR")
    warnings = []
    if unused_rows.size:
        warnings.append(f"{landmarks.path}: {unused_rows.size} of {len(landmarks.names)} landmark lines name no "
                        f"image in {src_dir} (e.g. {_listing(unused)}); they were ignored")
    return warnings


def check_record_keys(src_dir: Path, folders: IdentityFolders) -> None:
    """Refuse, before any image is read, a pack whose identity records float32 cannot hold.

    The insightface layout stores each identity's ``[start, end)`` record keys and the header's
    ``[first_identity_record, end]`` as float32 labels, exact for integers up to 2**24 only (the
    writer refuses a rounded key). Without this check a pack of more than 16.7M images (WebFace42M:
    42.5M) would read every image, for hours, and then fail on its first identity record.
    """
    starts = np.concatenate([[1], 1 + np.cumsum(folders.counts)])  # start keys; the last = first identity record
    keys = np.append(starts, starts[-1] + len(folders.names))  # and the header's end key
    rounded = keys.astype(np.float32).astype(np.int64) != keys
    if rounded.any():
        key = int(keys[int(np.argmax(rounded))])
        raise data_error(src_dir, "", f"{folders.images} images of {len(folders.names)} identities need record keys up "
                         f"to {int(keys[-1])}, but the insightface layout stores key ranges as float32 labels, exact "
                         f"only up to {_FLOAT32_EXACT_LIMIT} (key {key} would be rounded)",
                         f"Pack a subset of the identity folders: at most {_FLOAT32_EXACT_LIMIT - 1} records "
                         "(images + identities + 1) per dataset")


def _pool(workers: int) -> multiprocessing.pool.Pool:
    # spawn, not fork: the caller may already run threads (torch, ray) that fork would copy half-locked.
    return multiprocessing.get_context("spawn").Pool(processes=workers)


def _pack_tasks(folders: IdentityFolders, options: PackOptions, landmarks: FivePoints | None) -> Iterator[_Task]:
    """The worker tasks in pack order, made one identity folder at a time (nothing per image is kept)."""
    for label, name in enumerate(folders.names):
        folder = str(folders.src_dir / name)
        for file in folders.files(label):
            points = None if landmarks is None else landmarks.points[landmarks.row_of[f"{name}/{file}"]]
            yield label, os.path.join(folder, file), options, points


def _load_chunk(tasks: list[_Task]) -> list[tuple[int, bytes]]:
    return [_load_task(task) for task in tasks]


def _chunks(tasks: Iterator[_Task], size: int) -> Iterator[list[_Task]]:
    while chunk := list(itertools.islice(tasks, size)):
        yield chunk


def _bounded_imap(pool: multiprocessing.pool.Pool, chunks: Iterator[list[_Task]],
                  window: int) -> Iterator[tuple[int, bytes]]:
    """``pool.imap`` over chunks with at most ``window`` chunks submitted ahead of the consumer. WHY
    not imap itself: its feeder thread takes tasks as fast as the pipe accepts them and its results
    queue is unbounded, so neither the tasks nor the loaded images in flight would be bounded."""
    pending: collections.deque[multiprocessing.pool.AsyncResult] = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_load_chunk, (chunk,)))
        if len(pending) >= window:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def pack_folders(src_dir: str | Path, out_dir: str | Path, options: PackOptions) -> dict[str, object]:
    """Pack ``SRC/<identity>/<image>`` into an insightface dataset in ``out_dir``; returns a summary.

    SRC is listed and checked first (:func:`scan_identity_folders`), then each identity folder is
    listed again as its images are read, and at most a few chunks of images per worker are in flight:
    the memory held is O(identities), not O(images). With ``options.landmarks`` the file is read
    here, once, and matched to the images before anything is written; each worker task carries its
    image's points. The summary's ``aligned`` counts the images warped onto the ArcFace crop (0
    without landmarks) and ``warnings`` lists what was accepted but worth saying (landmark lines
    naming no image).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_output_dir(out_dir, options.overwrite)
    folders = scan_identity_folders(src_dir, progress=options.progress)
    images = folders.images
    check_record_keys(src_dir, folders)
    landmarks = None
    warnings: list[str] = []
    if options.landmarks is not None:
        landmarks = read_five_points(options.landmarks)
        warnings = check_landmarks(src_dir, folders.relative_names(), landmarks, options.image_size[0])
    tasks = _pack_tasks(folders, options, landmarks)
    bar = tqdm(total=images, unit="img", desc="fr_pack", disable=not options.progress)

    def counted(loaded: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        for item in loaded:
            bar.update(1)
            yield item

    num_classes = len(folders.names)
    try:
        if options.workers > 1:
            with _pool(options.workers) as pool:
                chunk = max(1, min(256, images // (8 * options.workers)))
                loaded = _bounded_imap(pool, _chunks(tasks, chunk), window=4 * options.workers)
                write_insightface_dataset(out_dir, counted(loaded), num_classes, options.image_size,
                                          overwrite=options.overwrite)
        else:
            write_insightface_dataset(out_dir, counted(map(_load_task, tasks)), num_classes, options.image_size,
                                      overwrite=options.overwrite)
    finally:
        bar.close()
    names = folders.names
    (out_dir / "identities.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(names)), encoding="utf-8")
    return {"images": images, "identities": num_classes, "hidden_files_ignored": folders.hidden,
            "out_dir": str(out_dir), "aligned": images if options.landmarks is not None else 0,
            "landmarks": None if options.landmarks is None else str(options.landmarks), "warnings": warnings}


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def _check_images(args: tuple[str, np.ndarray]) -> np.ndarray:
    """Decode every image of ``keys`` and return their class labels (worker side of --verify)."""
    directory, keys = args
    dataset = _worker_dataset(directory)
    labels = np.empty(len(keys), dtype=np.int64)
    height, width = dataset.image_size
    for i, key in enumerate(keys):
        label, image = dataset.read_image(int(key))
        where = f"key {int(key)} (byte offset {dataset.reader.offset(int(key))})"
        try:
            with Image.open(io.BytesIO(image)) as probe:
                probe.verify()
            with Image.open(io.BytesIO(image)) as decoded:
                decoded.load()
                fmt, size, mode = decoded.format, decoded.size, decoded.mode
        except Exception as exc:  # PIL raises many types for garbage input; all mean "not an image"
            raise data_error(dataset.rec_path, where, f"payload is not a decodable image ({type(exc).__name__}: {exc})",
                             "DALI's decoder would fail on it; remove the record and re-pack the dataset") from None
        if mode in _HIGH_DEPTH_MODES or mode == "F":
            raise data_error(dataset.rec_path, where, f"image is {mode} (more than 8 bits per sample): DALI's RGB decode "
                             "does not scale it as fr_pack does", "Re-pack the source images with fr_pack (it scales "
                             "16-bit images to 8 bits)")
        if fmt not in _DALI_FORMATS:
            raise data_error(dataset.rec_path, where, f"image format {fmt} is not one DALI decodes",
                             "Re-encode it as JPEG and re-pack the dataset")
        if size != (width, height):
            raise data_error(dataset.rec_path, where,
                             f"image is {size[0]}x{size[1]} (WxH) but {dataset.property_path.name} says {width}x{height}",
                             "Re-pack with the right size (fr_pack --image-size / --resize) or fix the property file")
        labels[i] = label
    return labels


_WORKER_DATASETS: dict[str, FaceRecordDataset] = {}  # per-process cache: one mmap/index parse per worker


def _worker_dataset(directory: str) -> FaceRecordDataset:
    if directory not in _WORKER_DATASETS:
        _WORKER_DATASETS[directory] = open_dataset(directory)
    return _WORKER_DATASETS[directory]


def _check_identity_records(dataset: FaceRecordDataset, labels: np.ndarray) -> int:
    """insightface layout: identity records must tile the image keys and match the image labels."""
    first, end = dataset.identity_range
    num_ids = end - first
    if num_ids != dataset.num_classes:
        raise data_error(dataset.property_path, "", f"num_classes is {dataset.num_classes} but the .rec has {num_ids} "
                         f"identity records (keys {first}..{end - 1})", "Fix the property file or re-pack the dataset")
    expected_start = 1
    reader = dataset.reader
    for c in range(num_ids):
        key = first + c
        where = f"identity record key {key} (byte offset {reader.offset(key)})"
        header, rest = unpack_record(reader.read(key), path=dataset.rec_path, where=where)
        if header.flag != 2 or rest:
            raise data_error(dataset.rec_path, where, f"expected an identity record (flag 2, no image), got flag "
                             f"{header.flag} with {len(rest)} image bytes", "Re-pack the dataset")
        start_f, stop_f = header.label  # type: ignore[misc]
        # Labels are float32: compare against the float32 rounding of the exact key.
        if start_f != float(np.float32(expected_start)) or stop_f < start_f or stop_f > float(np.float32(first)):
            raise data_error(dataset.rec_path, where, f"identity {c} covers keys [{start_f:.0f}, {stop_f:.0f}) but "
                             f"identity ranges must tile [1, {first}) in order (expected start {expected_start})",
                             "Re-pack the dataset")
        start, stop = expected_start, _identity_stop(labels, c, expected_start, stop_f, first)
        wrong = np.flatnonzero(labels[start - 1:stop - 1] != c)
        if wrong.size:
            bad = start + int(wrong[0])
            raise data_error(dataset.rec_path, f"key {bad} (byte offset {reader.offset(bad)})",
                             f"image label {int(labels[bad - 1])} disagrees with identity record key {key}, which "
                             f"puts keys [{start}, {stop}) in class {c}", "Re-pack the dataset")
        expected_start = stop
    if expected_start != first:
        raise data_error(dataset.rec_path, f"identity record key {end - 1}", f"identity ranges end at key "
                         f"{expected_start} but images run up to key {first - 1}", "Re-pack the dataset")
    return num_ids


def _identity_stop(labels: np.ndarray, label: int, start: int, stop_f: float, first: int) -> int:
    """The end key an identity record's float32 ``stop_f`` stands for. Up to 2**24 it is exact; above,
    float32 holds every 2nd (4th, ...) integer only, and packs written with MXNet past that size
    (Glint360K's 17.1M images) hold the rounded key. The stop is then the key within that rounding
    where the image labels (``labels[k - 1]`` of key k) change from ``label``, if there is one; else
    the rounded key, which the caller's label check refutes."""
    stop = int(stop_f)
    if stop <= _FLOAT32_EXACT_LIMIT:
        return stop
    spacing = int(np.spacing(np.float32(stop_f)))
    for candidate in range(max(start, stop - spacing), min(first, stop + spacing) + 1):
        if (float(np.float32(candidate)) == stop_f and (candidate == first or labels[candidate - 1] != label)
                and (candidate == start or labels[candidate - 2] == label)):
            return candidate
    return stop


def verify_dataset(directory: str | Path, workers: int = 1, progress: bool = False,
                   chunk: int = 512) -> dict[str, object]:
    """Check a dataset end to end; returns a summary or raises DataFormatError at the first problem.

    Checks, in order: property and layout; every ``.idx`` offset is a record boundary and index and
    ``.rec`` list the same records (each record once); every image record decodes, has the
    property's size and a label in ``0..num_classes-1``; insightface identity records tile the
    image keys in order and agree with the image labels.
    """
    if progress:  # the index check reads the whole .rec before the bar starts (~2 min at 42.5M images)
        print(f"verify: checking {Path(directory) / IDX_NAME} against {REC_NAME} before decoding the images...",
              file=sys.stderr, flush=True)
    dataset = open_dataset(directory)
    records = dataset.reader.check_index()
    if dataset.identity_range is not None and records != dataset.identity_range[1]:
        extra = int(dataset.reader.keys[dataset.reader.keys >= dataset.identity_range[1]][0])
        raise data_error(dataset.rec_path, f"key {extra} (byte offset {dataset.reader.offset(extra)})",
                         f"record lies beyond the insightface header's end key {dataset.identity_range[1]}: it is "
                         "neither an image nor an identity record", "Re-pack the dataset")
    keys = dataset.image_keys
    chunks = [keys[i:i + chunk] for i in range(0, len(keys), chunk)]
    jobs = [(str(dataset.directory), chunk) for chunk in chunks]
    bar = tqdm(total=len(keys), unit="img", desc="verify", disable=not progress)
    parts: list[np.ndarray] = []
    try:
        if workers > 1 and len(chunks) > 1:
            with _pool(workers) as pool:
                for labels in pool.imap(_check_images, jobs):
                    parts.append(labels)
                    bar.update(len(labels))
        else:
            for job in jobs:
                parts.append(_check_images(job))
                bar.update(len(parts[-1]))
    finally:
        bar.close()
    labels = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    per_class = np.bincount(labels, minlength=dataset.num_classes)
    if dataset.layout == "insightface":
        _check_identity_records(dataset, labels)
    return {
        "ok": True,
        "layout": dataset.layout,
        "images": len(keys),
        "identities": dataset.num_classes,
        "records": records,
        "classes_without_images": int(np.count_nonzero(per_class == 0)),
        "image_size": list(dataset.image_size),
        "rec_bytes": dataset.reader.size,
        "warnings": _class_warnings(dataset, per_class),
    }


def _class_warnings(dataset: FaceRecordDataset, per_class: np.ndarray) -> list[str]:
    """Classes without images are legal (the data is consistent) but worth saying: each is a head
    prototype that is never pulled towards any image, and a property file claiming far more classes
    than the labels use (1000 for 8) is usually a wrong file rather than a real dataset."""
    empty = np.flatnonzero(per_class == 0)
    if empty.size == 0:
        return []
    shown = ", ".join(str(int(c)) for c in empty[:5]) + (", ..." if empty.size > 5 else "")
    return [f"{dataset.property_path}: {empty.size} of {dataset.num_classes} classes have no images (classes "
            f"{shown}); they would be dead prototypes of the head. If the class count is wrong, move the property "
            f"file away and recreate it from the labels with `fr_pack --write-property {dataset.directory}`"]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fr_pack",
        description="Pack SRC_DIR/<identity>/<image> folders into an insightface RecordIO dataset "
                    "(train.rec, train.idx, property), or verify / complete an existing one.",
    )
    parser.add_argument("src_dir", nargs="?", type=Path, help="folder with one sub-folder per identity")
    parser.add_argument("out_dir", nargs="?", type=Path, help="where train.rec/train.idx/property go")
    parser.add_argument("--verify", metavar="DIR", type=Path, help="check DIR's dataset end to end")
    parser.add_argument("--write-property", metavar="DIR", type=Path,
                        help="create DIR/property for a .rec that lacks it (classes counted from the labels)")
    parser.add_argument("--json", action="store_true", help="with --verify: print a JSON summary as the last line")
    parser.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=[112, 112],
                        help="size every packed image must have (default 112 112)")
    parser.add_argument("--resize", action="store_true", help="rescale images of another size instead of failing")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes reading/decoding images (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="pack into a non-empty OUT_DIR, replacing the dataset in it (refused otherwise)")
    parser.add_argument("--landmarks", metavar="FILE", type=Path,
                        help="SRC_DIR holds raw photos: align each onto the ArcFace crop of --image-size (square) "
                             "by its five points in FILE, lines 'IDENTITY/IMAGE x1 y1 ... x5 y5 [SCORE]' (path "
                             "relative to SRC_DIR; points in the file's stored pixels: left eye, right eye, nose, "
                             "mouth corners), and store the crop as JPEG at --quality")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``fr_pack``; returns the process exit status (0 ok, 1 data error or an
    output directory that is not empty without --overwrite)."""
    parser = _parser()
    args = parser.parse_args(argv)
    modes = [args.verify is not None, args.write_property is not None, args.src_dir is not None]
    if sum(modes) != 1 or (args.src_dir is not None and args.out_dir is None):
        parser.error("use exactly one of: SRC_DIR OUT_DIR | --verify DIR | --write-property DIR")
    if args.json and args.verify is None:
        parser.error("--json only applies to --verify")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.overwrite and args.src_dir is None:
        parser.error("--overwrite only applies to packing SRC_DIR OUT_DIR")
    if args.landmarks is not None:
        if args.src_dir is None:
            parser.error("--landmarks only applies to packing SRC_DIR OUT_DIR")
        if args.resize:
            parser.error("--resize does not apply with --landmarks: each photo is aligned straight to --image-size")
        if args.image_size[0] != args.image_size[1]:
            parser.error(f"--landmarks makes square ArcFace crops: --image-size must be square, got "
                         f"{args.image_size[0]} {args.image_size[1]}")
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        if args.verify is not None:
            summary = verify_dataset(args.verify, workers=args.workers, progress=progress)
            print(f"OK {args.verify}: {summary['images']} images, {summary['identities']} identities, "
                  f"layout {summary['layout']}, {summary['records']} records, "
                  f"{summary['classes_without_images']} classes without images")
            for warning in cast(list[str], summary["warnings"]):
                print(f"fr_pack: warning: {warning}", file=sys.stderr)
            if args.json:
                print(json.dumps(summary))
        elif args.write_property is not None:
            path = _write_property_for(args.write_property)
            print(f"wrote {path}: {path.read_text(encoding='ascii').strip()}")
        else:
            options = PackOptions(image_size=(args.image_size[0], args.image_size[1]), resize=args.resize,
                                  quality=args.quality, workers=args.workers, progress=progress,
                                  overwrite=args.overwrite, landmarks=args.landmarks)
            summary = pack_folders(args.src_dir, args.out_dir, options)
            for warning in cast(list[str], summary["warnings"]):
                print(f"fr_pack: warning: {warning}", file=sys.stderr)
            aligned = (f"; {summary['aligned']} aligned to the {args.image_size[0]}x{args.image_size[1]} ArcFace "
                       f"crop by the landmarks in {args.landmarks}" if args.landmarks is not None else "")
            print(f"packed {summary['images']} images of {summary['identities']} identities into {args.out_dir} "
                  f"({summary['hidden_files_ignored']} hidden files ignored{aligned})")
    except (DataFormatError, FileExistsError) as exc:
        print(f"fr_pack: error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        return 1
    return 0


def _write_property_for(directory: Path) -> Path:
    """Create ``property`` from the labels and the first image of a dataset that lacks it."""
    directory = Path(directory)
    with RecordReader(directory / REC_NAME, directory / IDX_NAME) as reader:
        layout = detect_layout(reader)
        return write_property(directory, reader, layout)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
