"""One file of named numpy arrays, memory-mapped on read and checked before it is trusted.

The format of fr_train's index caches (data_pipeline/index_cache.py, data_pipeline/dali.py). WHY not
``.npz``/``.npy``: an ``.npz`` cannot be memory-mapped (every rank held a private copy: 24 bytes per
image at 42.5M images is ~1 GB per rank), and several ``.npy`` files need a multi-file commit. One
file, written to a temporary name and renamed (data_pipeline/atomic.py), is whole or absent; the
ranks of a node map the same pages, so the arrays count once per node.

Layout: the 8 bytes ``FRARRAY1``, a little-endian uint64 header length, a UTF-8 JSON header, zero
padding to 64 bytes, then each array's bytes at the 64-byte-aligned offset its header entry names.
The header holds the caller's ``meta`` and, per array, dtype, shape, offset, byte count and CRC-32.
A reader refuses (returns None, so the caller rebuilds) a file whose header, size or any array's
CRC-32 disagrees: a stale or damaged cache is never trusted. (CRC-32: ~2.4 GB/s here, made for
detecting accidental damage; nothing here defends against a forged file — the cache is written by
the same user who reads it.)
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.atomic import atomic_path

MAGIC = b"FRARRAY1"
_ALIGN = 64
_MAX_HEADER = 1 << 24  # a header past 16 MB is no header of ours
_CRC_CHUNK = 1 << 26


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _crc32(buffer: memoryview) -> int:
    crc = 0
    for lo in range(0, len(buffer), _CRC_CHUNK):
        crc = zlib.crc32(buffer[lo:lo + _CRC_CHUNK], crc)
    return crc


def file_crc32(path: str | os.PathLike[str]) -> int:
    """CRC-32 of a whole file, read through a memory map (the pages go to the shared page cache)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            view = memoryview(buf)
            try:
                return _crc32(view)
            finally:
                view.release()


def write_array_file(path: str | os.PathLike[str], meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` (any numeric dtypes, stored little-endian) and ``meta`` (JSON) atomically."""
    prepared = {name: np.ascontiguousarray(a, dtype=np.asarray(a).dtype.newbyteorder("<")) for name, a in arrays.items()}
    entries, offset = {}, 0
    for name, a in prepared.items():
        entries[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes,
                         "crc32": _crc32(memoryview(a).cast("B")) if a.nbytes else 0}
        offset = _aligned(offset + a.nbytes)
    header = json.dumps({"meta": meta, "arrays": entries}).encode("utf-8")
    start = _aligned(len(MAGIC) + 8 + len(header))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for name, a in prepared.items():
            f.write(b"\0" * (start + entries[name]["offset"] - f.tell()))
            if a.nbytes:
                f.write(memoryview(a).cast("B"))
        if not prepared or f.tell() < start:
            f.write(b"\0" * (start - f.tell()))
    return Path(path)


def read_array_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """``(meta, arrays)`` with the arrays read-only views of one shared memory map; None when the file
    is absent, not of this format, cut short, or any array's CRC-32 does not match."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(MAGIC) + 8:
                return None
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError):
        return None
    if buf[:len(MAGIC)] != MAGIC:
        return None
    (length,) = struct.unpack_from("<Q", buf, len(MAGIC))
    if length > min(_MAX_HEADER, size - len(MAGIC) - 8):
        return None
    try:
        header = json.loads(bytes(buf[len(MAGIC) + 8:len(MAGIC) + 8 + length]).decode("utf-8"))
        meta, entries = header["meta"], header["arrays"]
        start = _aligned(len(MAGIC) + 8 + length)
        end = max((start + int(e["offset"]) + int(e["nbytes"]) for e in entries.values()), default=start)
        if size != end:  # cut short, or bytes after the last array: not the file that was written
            return None
        view = memoryview(buf)
        arrays = {}
        for name, e in entries.items():
            dtype, shape = np.dtype(e["dtype"]), tuple(int(d) for d in e["shape"])
            lo, nbytes = start + int(e["offset"]), int(e["nbytes"])
            if nbytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or lo + nbytes > size:
                return None
            if nbytes and _crc32(view[lo:lo + nbytes]) != int(e["crc32"]):
                return None
            arrays[name] = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=lo).reshape(shape)
        del view
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    return meta, arrays


__all__ = ["file_crc32", "read_array_file", "write_array_file"]
