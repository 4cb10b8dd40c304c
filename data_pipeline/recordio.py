"""MXNet RecordIO, byte-compatible with dmlc-core's RecordIOWriter/Reader and mx.recordio.

On disk a logical record is one or more *parts*, each ``uint32 magic 0xced7230a``, ``uint32 lrecord``
(``cflag << 29 | length``) and ``length`` payload bytes, and the record is zero-padded to 4 bytes.
dmlc splits a payload wherever the magic word sits at a 4-byte-aligned position inside it, drops that
word and marks the parts (cflag 1 first, 2 middle, 3 last; 0 = not split); readers re-insert the word
between parts. WHY it matters: after this escaping, an aligned magic word in the file can only be the
start of a part, so a byte offset is a record boundary iff it is aligned, holds the magic and its
cflag is 0 or 1. The reader uses that to validate every ``.idx`` offset exactly.

The payload of an image record is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2); when flag > 0,
``flag`` float32 labels follow the header (and the header's label field is 0), then the image bytes.
"""

from __future__ import annotations

import mmap
import operator
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from data_pipeline.errors import DataFormatError, data_error
from data_pipeline.idx_text import _REPACK_HINT, _REPACK_TAIL, read_index
from data_pipeline.index_cache import IndexArrays, load_index

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
#: dmlc refuses payloads of 2**29 bytes or more (the length field has 29 bits).
MAX_PAYLOAD_BYTES = (1 << _LENGTH_BITS) - 1
CFLAG_WHOLE, CFLAG_FIRST, CFLAG_MIDDLE, CFLAG_LAST = 0, 1, 2, 3
_PART_HEAD = struct.Struct("<II")

IR_FORMAT = "<IfQQ"
_IR = struct.Struct(IR_FORMAT)
IR_SIZE = _IR.size  # 24 bytes, identical to MXNet's native 'IfQQ' on little-endian machines


@dataclass(frozen=True)
class IRHeader:
    """MXNet's image-record header.

    ``flag == 0``: ``label`` is one float. ``flag == n > 0``: ``label`` is a tuple of n floats that
    are stored after the header (MXNet writes 0 in the header's own label field then).
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _part_head(cflag: int, length: int) -> bytes:
    return _PART_HEAD.pack(MAGIC, (cflag << _LENGTH_BITS) | length)


def encode_record(payload: bytes | bytearray | memoryview) -> bytes:
    """The exact bytes dmlc's ``RecordIOWriter::WriteRecord`` emits for one payload.

    Each 4-byte-aligned occurrence of the magic word ends the current part (cflag 1 for the first
    part, 2 afterwards) and is itself dropped; the last part gets cflag 3 (0 if nothing was split).
    Padding to 4 bytes comes once, after the last part.
    """
    data = memoryview(payload).cast("B")
    n = len(data)
    if n > MAX_PAYLOAD_BYTES:
        raise ValueError(f"RecordIO payloads must be shorter than 2**29 bytes; got {n} bytes")
    raw = bytes(data) if not isinstance(payload, bytes) else payload
    pieces: list[bytes | memoryview] = []
    start = 0  # first byte of the current part
    hit = raw.find(MAGIC_BYTES)
    while hit != -1:
        if hit % 4 == 0:
            pieces.append(_part_head(CFLAG_FIRST if start == 0 else CFLAG_MIDDLE, hit - start))
            pieces.append(data[start:hit])
            start = hit + 4
            hit = raw.find(MAGIC_BYTES, start)
        else:
            hit = raw.find(MAGIC_BYTES, hit + 1)
    pieces.append(_part_head(CFLAG_LAST if start else CFLAG_WHOLE, n - start))
    pieces.append(data[start:])
    pieces.append(b"\x00" * (_align4(n) - n))
    return b"".join(pieces)


def pack_record(header: IRHeader, image_bytes: bytes = b"") -> bytes:
    """``mx.recordio.pack``: IRHeader (+ float32 labels when multi-label) + image bytes.

    Unlike MXNet, which silently overwrites ``flag``, a flag that disagrees with the label is an
    error: a scalar label needs flag 0, a sequence of n labels needs flag n.
    """
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)) and not isinstance(label, bool):
        if header.flag != 0:
            raise ValueError(f"IRHeader with a scalar label must have flag 0, got flag {header.flag}")
        return _IR.pack(0, float(label), header.id, header.id2) + bytes(image_bytes)
    labels = np.asarray(label, dtype="<f4")
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"IRHeader label must be a number or a non-empty 1-D sequence, got {label!r}")
    if header.flag != labels.size:
        raise ValueError(f"IRHeader flag must equal the number of labels ({labels.size}), got {header.flag}")
    return _IR.pack(labels.size, 0.0, header.id, header.id2) + labels.tobytes() + bytes(image_bytes)


def unpack_record(
    payload: bytes, *, path: str | Path = "<payload>", where: str = ""
) -> tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: split a payload into its IRHeader and the image bytes.

    ``path``/``where`` only enrich the error message when the payload is too short for its header.
    """
    if len(payload) < IR_SIZE:
        raise data_error(
            path, where, f"record payload has {len(payload)} bytes, fewer than the {IR_SIZE}-byte IRHeader",
            "This record is not an MXNet image record; " + _REPACK_TAIL,
        )
    flag, label, rid, rid2 = _IR.unpack_from(payload, 0)
    if flag == 0:
        return IRHeader(0, float(label), rid, rid2), payload[IR_SIZE:]
    end = IR_SIZE + 4 * flag
    if len(payload) < end:
        raise data_error(
            path, where,
            f"IRHeader flag says {flag} float32 labels follow, but the payload has only {len(payload)} bytes",
            "The record header is corrupt; " + _REPACK_TAIL,
        )
    labels = tuple(float(x) for x in np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_SIZE))
    return IRHeader(flag, labels, rid, rid2), payload[end:]


def class_label(header: IRHeader, *, path: str | Path = "<payload>", where: str = "") -> int:
    """The integer class of an image record: the scalar label, or the first of several labels.

    Labels are stored as float32; a class must be a finite, non-negative whole number.
    """
    value = header.label if header.flag == 0 else header.label[0]  # type: ignore[index]
    if not np.isfinite(value) or value < 0 or value != int(value):
        raise data_error(
            path, where, f"label {value!r} is not a non-negative whole number, so it is not a class index",
            "Class labels must be 0..num_classes-1; " + _REPACK_TAIL,
        )
    return int(value)


class RecordWriter:
    """Write a ``.rec`` (and optionally its ``.idx``) exactly as MXNet's MXIndexedRecordIO does.

    Use as a context manager; ``write`` returns the byte offset the record starts at, which is what
    the ``.idx`` line stores. Keys must be unique non-negative integers.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec = open(self.rec_path, "wb")  # noqa: SIM115 - closed in close()
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n") if self.idx_path else None  # noqa: SIM115
        self._pos = 0
        self._keys = array("q")
        self._max_key = -1

    def write(self, key: int, payload: bytes) -> int:
        """Append one logical record; returns its byte offset in the ``.rec``."""
        if self._rec.closed:
            raise ValueError(f"RecordWriter for {self.rec_path} is closed")
        key = operator.index(key)
        if key < 0:
            raise ValueError(f"RecordIO keys must be non-negative integers, got {key}")
        # O(1) for increasing keys (the usual case); a full check only when keys go backwards.
        if self._idx is not None and key <= self._max_key and key in np.frombuffer(self._keys, dtype=np.int64):
            raise ValueError(f"{self.idx_path}: key {key} was already written; .idx keys must be unique")
        encoded = encode_record(payload)
        offset = self._pos
        self._rec.write(encoded)
        self._pos += len(encoded)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
            self._keys.append(key)
            self._max_key = max(self._max_key, key)
        return offset

    def tell(self) -> int:
        """Byte offset the next record will start at."""
        return self._pos

    def close(self) -> None:
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RecordReader:
    """Memory-mapped reader of a ``.rec`` with random access through its ``.idx``.

    Every read validates what it touches (magic, continuation flags, lengths against the file
    size) and raises DataFormatError naming the file, the key and the byte offset. Without an
    ``idx_path`` only sequential access (``scan``, ``read_at``) is available.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        try:
            with open(self.rec_path, "rb") as f:
                self._size = f.seek(0, 2)
                self._buf: mmap.mmap | bytes = (
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self._size else b""
                )
        except FileNotFoundError:
            raise data_error(self.rec_path, "", "RecordIO file not found", "Check the path") from None
        # The .idx arrays, memory-mapped from its cache (data_pipeline/index_cache.py): nothing per record
        # is private to this process.
        self._index: IndexArrays | None = load_index(self.idx_path) if self.idx_path is not None else None

    # -- index ---------------------------------------------------------------------------------
    def _require_index(self) -> tuple[np.ndarray, np.ndarray]:
        index = self._require_arrays()
        return index.keys, index.offsets

    def _require_arrays(self) -> IndexArrays:
        if self._index is None:
            raise ValueError(f"RecordReader({self.rec_path}) was opened without an .idx; pass idx_path for keyed access")
        return self._index

    @property
    def size(self) -> int:
        """Size of the ``.rec`` in bytes."""
        return self._size

    @property
    def keys(self) -> np.ndarray:
        """All keys of the ``.idx`` in file order (int64, read-only view)."""
        keys = self._require_index()[0].view()
        keys.flags.writeable = False
        return keys

    @property
    def offsets(self) -> np.ndarray:
        """Byte offsets of the ``.idx`` in file order, aligned with ``keys`` (int64, read-only view)."""
        offsets = self._require_index()[1].view()
        offsets.flags.writeable = False
        return offsets

    @property
    def sorted_keys(self) -> np.ndarray:
        """All keys of the ``.idx`` in ascending order (int64, read-only view)."""
        keys = self._require_arrays().sorted_keys.view()
        keys.flags.writeable = False
        return keys

    def __len__(self) -> int:
        return len(self._require_arrays())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (int, np.integer)) and self._require_arrays().offset_of(int(key)) >= 0

    def offset(self, key: int) -> int:
        """Byte offset of ``key`` as listed in the ``.idx``; KeyError naming the index if absent."""
        offset = self._require_arrays().offset_of(int(key))
        if offset < 0:
            raise KeyError(f"{self.idx_path}: key {key} is not in the index")
        return offset

    def lists_all_keys_below(self, end: int) -> bool:
        """Whether every key ``0..end-1`` is in the index. O(1): keys are unique and non-negative, so
        the ``end`` smallest are exactly ``0..end-1`` iff the ``end``-th smallest is ``end - 1``."""
        keys = self._require_arrays().sorted_keys
        return end <= 0 or (len(keys) >= end and int(keys[end - 1]) == end - 1)

    def _key_where(self, key: int, offset: int) -> str:
        return f"key {key} (byte offset {offset} listed in {self.idx_path})"

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (multi-part records reassembled)."""
        offset = self.offset(key)
        return self._record(offset, self._key_where(key, offset), from_index=True)[0]

    def read_prefix(self, key: int, nbytes: int) -> bytes:
        """The first ``nbytes`` of record ``key``'s payload (fewer if it is shorter), e.g. its IRHeader.

        Stops after the parts that cover ``nbytes``, so reading a label does not copy the image.
        """
        offset = self.offset(key)
        return self._record(offset, self._key_where(key, offset), from_index=True, limit=nbytes)[0][:nbytes]

    def read_at(self, offset: int) -> bytes:
        """The payload of the record starting at byte ``offset`` (validated as a record boundary)."""
        return self._record(offset, f"byte offset {offset}", from_index=False)[0]

    # -- sequential --------------------------------------------------------------------------
    def scan(self) -> Iterator[tuple[int, bytes]]:
        """``(offset, payload)`` of every record in file order, without the ``.idx``."""
        pos = 0
        while pos < self._size:
            payload, end = self._record(pos, f"byte offset {pos}", from_index=False)
            yield pos, payload
            pos = end

    def record_offsets(self) -> np.ndarray:
        """Start offsets of all records in file order (int64), walking headers only."""
        found = array("q")
        pos = 0
        while pos < self._size:
            found.append(pos)
            pos = self._record(pos, f"byte offset {pos}", from_index=False, want_payload=False)[1]
        return np.frombuffer(found, dtype=np.int64).copy() if found else np.zeros(0, dtype=np.int64)

    def check_index(self) -> int:
        """Check that the ``.idx`` and the ``.rec`` describe the same records; returns the count.

        Every record of the file must be listed exactly once and every listed offset must be the
        start of a record. Raises DataFormatError naming the first offending key or offset.
        """
        keys, offsets = self._require_index()
        starts = self.record_offsets()  # also validates the whole file: magic, flags, truncation
        if len(starts):
            pos = np.minimum(np.searchsorted(starts, offsets), len(starts) - 1)
            listed = starts[pos] == offsets
        else:
            listed = np.zeros(len(offsets), dtype=bool)
        if not listed.all():
            row = int(np.argmax(~listed))
            # _record names the precise reason: past EOF, unaligned, no magic, inside a multi-part record.
            # (An offset it accepts is always in `starts`: after dmlc's escaping an aligned magic word
            # with flag 0/1 can only be a record start, and the walk above visited all of them.)
            where = self._key_where(int(keys[row]), int(offsets[row]))
            self._record(int(offsets[row]), where, from_index=True)
            raise data_error(self.idx_path or "", where, "offset is not the start of a record found by walking the "
                             ".rec from its beginning (the writer did not escape the magic word?)", _REPACK_HINT)
        order = np.argsort(offsets, kind="stable")
        same = np.flatnonzero(offsets[order][1:] == offsets[order][:-1])
        if same.size:
            a, b = int(keys[order[same[0]]]), int(keys[order[same[0] + 1]])
            raise data_error(self.idx_path or "", f"keys {a} and {b}",
                             f"both point at the record at byte offset {int(offsets[order[same[0]]])}",
                             "Each record must have exactly one key; " + _REPACK_TAIL)
        if len(starts) != len(offsets):
            missing = np.setdiff1d(starts, offsets, assume_unique=True)
            raise data_error(
                self.rec_path, f"byte offset {int(missing[0])}",
                f"record is not listed in {self.idx_path} ({len(starts)} records in the file, "
                f"{len(offsets)} in the index)",
                "The index was written for another file or cut short; " + _REPACK_TAIL,
            )
        return len(starts)

    # -- core ----------------------------------------------------------------------------------
    def _record(self, offset: int, where: str, *, from_index: bool,
                want_payload: bool = True, limit: int | None = None) -> tuple[bytes, int]:
        """Parse the logical record at ``offset``; returns (payload, offset just past it).

        With ``limit``, stops once the parts read cover ``limit`` payload bytes (the end offset is then
        that of the last part read).
        """
        size, buf = self._size, self._buf
        if offset < 0 or offset >= size:
            raise data_error(self.rec_path, where, f"offset is past the end of {self.rec_path.name} ({size} bytes)",
                             "The index does not belong to this .rec or the .rec is truncated; " + _REPACK_TAIL)
        if offset % 4:
            raise data_error(self.rec_path, where, "offset is not on a record boundary (records start at multiples of 4)",
                             _REPACK_HINT)
        parts: list[bytes] = []
        got = 0  # payload bytes covered so far (each part boundary re-inserts a 4-byte magic word)
        pos = offset
        first = True
        while True:
            if pos + 8 > size:
                raise data_error(self.rec_path, where, f"record header at byte offset {pos} is cut off by the end of "
                                 f"the file ({size} bytes): the file is truncated",
                                 "Re-copy the file or re-pack the dataset")
            magic, lrec = _PART_HEAD.unpack_from(buf, pos)
            cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            if magic != MAGIC:
                problem = (f"no record starts here: found 0x{magic:08x} instead of the RecordIO magic 0x{MAGIC:08x}"
                           if first else f"continuation part expected at byte offset {pos} but found 0x{magic:08x} "
                           "instead of the RecordIO magic")
                if first and from_index:
                    problem = "offset is not on a record boundary: " + problem
                raise data_error(self.rec_path, where, problem,
                                 "The file is corrupt or not MXNet RecordIO; " + _REPACK_TAIL)
            if first and cflag not in (CFLAG_WHOLE, CFLAG_FIRST):
                problem = (f"offset is not on a record boundary: it points inside a multi-part record (continuation "
                           f"flag {cflag})" if cflag <= CFLAG_LAST else f"invalid continuation flag {cflag}")
                raise data_error(self.rec_path, where, problem, _REPACK_HINT)
            if not first and cflag not in (CFLAG_MIDDLE, CFLAG_LAST):
                raise data_error(self.rec_path, where, f"multi-part record is broken: part at byte offset {pos} has "
                                 f"continuation flag {cflag}, expected 2 or 3", _REPACK_HINT)
            end = pos + 8 + length
            if end > size:
                raise data_error(self.rec_path, where, f"record part at byte offset {pos} declares {length} payload "
                                 f"bytes but the file ends after {size - pos - 8}: the file is truncated",
                                 "Re-copy the file or re-pack the dataset")
            if want_payload:
                parts.append(buf[pos + 8:end])
                got += length + 4
            pos = pos + 8 + _align4(length)
            if cflag in (CFLAG_WHOLE, CFLAG_LAST):
                break
            if limit is not None and got >= limit:
                parts.append(b"")  # the magic word that follows this part belongs to the prefix
                break
            first = False
        if pos > size:
            raise data_error(self.rec_path, where, f"record padding is cut off by the end of the file ({size} bytes): "
                             "the file is truncated", "Re-copy the file or re-pack the dataset")
        return (MAGIC_BYTES.join(parts) if want_payload else b""), pos

    def close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = [
    "IR_FORMAT",
    "IR_SIZE",
    "MAGIC",
    "MAX_PAYLOAD_BYTES",
    "DataFormatError",
    "IRHeader",
    "RecordReader",
    "RecordWriter",
    "class_label",
    "encode_record",
    "pack_record",
    "read_index",
    "unpack_record",
]
