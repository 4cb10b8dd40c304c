"""The MXNet ``.idx`` text format: ``key<TAB>offset`` lines, parsed and written with array operations.

One home for the text of an index: :func:`read_index` parses one (what every rank did on every open
before the binary cache, data_pipeline/index_cache.py), :func:`write_index_text` writes one
(DALI's image-only index, data_pipeline/dali.py). WHY arrays and not Python strings: splitting the
text cost ~140 bytes and 0.7 µs per line (issue 23: ~6 GB per rank at WebFace42M's 44.5M lines);
formatting 42.5M lines with f-strings held ~3 GB of strings.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_path
from data_pipeline.errors import data_error

_REPACK_TAIL = "re-create the .rec and .idx together (fr_pack, or MXNet's im2rec), or restore them from the source"
_REPACK_HINT = "R" + _REPACK_TAIL[1:]


_POW10 = 10 ** np.arange(18, dtype=np.int64)
_CHUNK_BYTES = 1 << 21  # text parsed per step: its temporaries stay near 80 MB at any index size


def _parse_canonical_index(data: np.ndarray) -> np.ndarray | None:
    """``(N, 2)`` int64 from an index whose every line is ``<digits>\t<digits>\n`` (what MXNet and
    fr_pack write), parsed with array operations in chunks of whole lines; None for anything else
    (then the string parser names the bad line). Why: splitting the text into Python strings cost
    ~140 bytes and 0.7 µs per line (issue 23: ~6 GB per rank at WebFace42M's 44.5M lines). ``data``
    may be a memory map: only the result (16 bytes per line) and one chunk's temporaries are private."""
    if data.size == 0 or data[-1] != 10:
        return None
    bounds = [0]
    while bounds[-1] < data.size:  # chunks of whole lines
        lo, hi = bounds[-1], min(bounds[-1] + _CHUNK_BYTES, data.size)
        if hi < data.size:
            back = np.flatnonzero(data[lo:hi] == 10)
            if back.size == 0:
                return None  # a line longer than a chunk is no canonical line
            hi = lo + int(back[-1]) + 1
        bounds.append(hi)
    lines = [int(np.count_nonzero(data[lo:hi] == 10)) for lo, hi in itertools.pairwise(bounds)]
    out = np.empty((sum(lines), 2), dtype=np.int64)
    row = 0
    for (lo, hi), n in zip(itertools.pairwise(bounds), lines, strict=True):
        if not _parse_chunk(np.asarray(data[lo:hi]), out[row:row + n]):
            return None
        row += n
    return out


def _parse_chunk(chunk: np.ndarray, out: np.ndarray) -> bool:
    """Parse whole canonical lines into ``out`` (one row per line); False if a line is not canonical."""
    is_tab, is_nl = chunk == 9, chunk == 10
    is_digit = (chunk >= 48) & (chunk <= 57)
    if not np.all(is_digit | is_tab | is_nl):
        return False
    sep = np.flatnonzero(is_tab | is_nl)  # field ends, alternating tab / newline on a canonical index
    if sep.size != 2 * len(out) or not (np.all(is_tab[sep[0::2]]) and np.all(is_nl[sep[1::2]])):
        return False
    starts = np.concatenate(([0], sep[:-1] + 1))
    width = sep - starts
    if width.min() < 1 or width.max() > 18:  # an empty field, or one that may not fit int64
        return False
    digits = np.flatnonzero(is_digit)
    field = np.repeat(np.arange(sep.size), width)  # the field each digit belongs to, in order
    contrib = (chunk[digits].astype(np.int64) - 48) * _POW10[sep[field] - digits - 1]  # d · 10^(place)
    out[:] = np.add.reduceat(contrib, starts - np.arange(sep.size)).reshape(-1, 2)
    return True


def read_index(idx_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse an MXNet ``.idx`` (``key<TAB>offset`` lines) into int64 ``(keys, offsets)`` in file order.

    Raises DataFormatError naming the line for a malformed line, a negative value or a duplicate key.
    """
    idx_path = Path(idx_path)
    try:
        size = idx_path.stat().st_size
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
    except FileNotFoundError:
        raise data_error(idx_path, "", "index file not found",
                         "Pass the .idx written with the .rec (fr_pack writes train.idx next to train.rec)") from None
    values = _parse_canonical_index(raw)
    if values is None:
        values = _parse_index_text(idx_path, raw)
    return _checked_columns(idx_path, values)


def _parse_index_text(idx_path: Path, raw: np.ndarray) -> np.ndarray:
    """Any other index (CRLF lines, spaces, a bad line): Python's string parser, naming the first bad line."""
    try:
        text = raw.tobytes().decode("ascii")
    except UnicodeDecodeError as exc:
        raise data_error(idx_path, f"byte offset {exc.start}", "index file is not ASCII text",
                         "An .idx holds 'key<TAB>offset' lines; " + _REPACK_TAIL) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    tokens = text.split()
    values: np.ndarray | None = None
    if len(tokens) == 2 * len(lines) and all(line.count("\t") == 1 for line in lines):
        try:
            values = np.array(tokens, dtype=np.int64).reshape(-1, 2)
        except (ValueError, OverflowError):
            values = None
    if values is None:  # slow path only to name the first bad line
        for number, line in enumerate(lines, start=1):
            fields = line.strip().split("\t")
            if len(fields) != 2 or not all(f.strip().lstrip("-").isdigit() for f in fields):
                raise data_error(idx_path, f"line {number}", f"expected 'key<TAB>offset' (two integers), got {line!r}",
                                 _REPACK_HINT)
        raise data_error(idx_path, "", "index could not be parsed as 'key<TAB>offset' lines", _REPACK_HINT)
    return values


def _checked_columns(idx_path: Path, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.ascontiguousarray(values[:, 0])
    offsets = np.ascontiguousarray(values[:, 1])
    for name, column in (("key", keys), ("offset", offsets)):
        if column.size and column.min() < 0:
            line = int(np.argmax(column < 0)) + 1
            raise data_error(idx_path, f"line {line}", f"negative {name} {int(column[line - 1])}", _REPACK_HINT)
    order = np.argsort(keys, kind="stable")
    dup = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if dup.size:
        first, second = sorted((int(order[dup[0]]) + 1, int(order[dup[0] + 1]) + 1))
        raise data_error(idx_path, f"lines {first} and {second}", f"key {int(keys[first - 1])} appears twice",
                         "Keys of an .idx must be unique; " + _REPACK_TAIL)
    return keys, offsets


_WRITE_LINES = 1 << 20  # lines formatted per step: ~50 MB of temporaries at any index size


def _digits(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 18) ASCII digits of int64 ``values`` in [0, 10^18), most significant first, and the mask
    of the significant ones (at least one digit per value)."""
    place = _POW10[::-1][None, :]  # 10^17 … 10^0
    digits = (values[:, None] // place % 10).astype(np.uint8) + 48
    width = np.maximum(1, np.searchsorted(_POW10, values, side="right"))  # number of decimal digits
    return digits, np.arange(17, -1, -1)[None, :] < width[:, None]


def format_index_lines(keys: np.ndarray, offsets: np.ndarray) -> bytes:
    """``key<TAB>offset\n`` for each pair (canonical lines, as MXNet and fr_pack write them)."""
    keys, offsets = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    if keys.shape != offsets.shape or keys.ndim != 1:
        raise ValueError(f"keys and offsets must be 1-D of one length, got {keys.shape} and {offsets.shape}")
    if keys.size and (min(int(keys.min()), int(offsets.min())) < 0 or max(int(keys.max()), int(offsets.max())) >= 10**18):
        raise ValueError("index keys and offsets must lie in [0, 10^18)")
    kd, km = _digits(keys)
    od, om = _digits(offsets)
    n = len(keys)
    text = np.concatenate([kd, np.full((n, 1), 9, np.uint8), od, np.full((n, 1), 10, np.uint8)], axis=1)
    keep = np.concatenate([km, np.ones((n, 1), bool), om, np.ones((n, 1), bool)], axis=1)
    return text[keep].tobytes()


def write_index_text(path: str | os.PathLike[str], keys: np.ndarray, offsets: np.ndarray) -> Path:
    """Write an ``.idx`` atomically (data_pipeline/atomic.py), in chunks: memory independent of its size."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for lo in range(0, len(keys), _WRITE_LINES):
            f.write(format_index_lines(keys[lo:lo + _WRITE_LINES], offsets[lo:lo + _WRITE_LINES]))
    return Path(path)


__all__ = ["format_index_lines", "read_index", "write_index_text"]
