"""The five-point landmark file: ``image x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]`` per line.

One home for the format insightface ships with IJB-B/C (``meta/ijbc_name_5pts_score.txt``: the
image name relative to ``loose_crop/``, the five points in that image's pixels — left eye, right
eye, nose, left and right mouth corner — and the detector's score) and that ``fr_pack --landmarks``
reads for a user's own photos. The score column may be left out (a user's detector may give
none): it then reads as 1.0, which weights nothing. Any other field count, a non-number, a
non-finite value or a name listed twice is refused with the file, the line and the fix.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import data_error

_FIX = ("Each line must be 'IMAGE x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [SCORE]' (the image name, the five "
        "landmarks in its pixels, optionally the detector score), as insightface's *_name_5pts_score.txt")


@dataclass(frozen=True)
class FivePoints:
    """Landmarks of many images, in file order: ``points[i]`` (5×2, x y) and ``scores[i]`` belong to ``names[i]``."""

    path: Path
    names: list[str]
    points: np.ndarray  # (n, 5, 2) float64
    scores: np.ndarray  # (n,) float64
    row_of: dict[str, int]  # name → its row
    lines: list[int]  # row → its 1-based line in the file, for errors


def read_five_points(path: str | Path) -> FivePoints:
    """Parse a five-point file (see the module docstring); DataFormatError names a bad line.

    A file of well-formed 12-field lines (every insightface release) is read by numpy's C text reader
    (~1.5 s for IJB-C's 469,375 lines instead of ~6 s); anything else, or any doubt, takes the line
    by line path below, which is also the one that names the bad line."""
    path = Path(path)
    fast = _read_canonical(path)
    if fast is not None:
        return fast
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise data_error(path, "", "landmark file not found", _FIX) from None
    except UnicodeDecodeError as e:
        raise data_error(path, f"byte {e.start}", "is not UTF-8 text", _FIX) from None
    names: list[str] = []
    rows: list[list[float]] = []
    row_of: dict[str, int] = {}
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (11, 12):
            raise data_error(path, f"line {number}", f"has {len(fields)} fields, want 11 or 12", _FIX)
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise data_error(path, f"line {number}", f"has a field that is not a number: {line.strip()!r}",
                             _FIX) from None
        if not all(math.isfinite(v) for v in values):
            raise data_error(path, f"line {number}", f"has a non-finite value: {line.strip()!r}",
                             "Drop the image or re-run the landmark detector on it")
        name = fields[0]
        if name in row_of:
            raise data_error(path, f"lines {lines[row_of[name]]} and {number}", f"both name {name!r}",
                             "List each image once")
        row_of[name] = len(names)
        lines.append(number)
        names.append(name)
        rows.append(values if len(values) == 11 else [*values, 1.0])
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 11)
    return FivePoints(path=path, names=names, points=table[:, :10].reshape(-1, 5, 2), scores=table[:, 10],
                      row_of=row_of, lines=lines)


def _read_canonical(path: Path) -> FivePoints | None:
    """The whole file as 12-field lines of finite numbers with unique names, or None (then the line
    by line reader decides, and names what is wrong)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file warns; the slow path words the error
            values = np.loadtxt(path, usecols=range(1, 12), dtype=np.float64, ndmin=2, comments=None,
                                encoding="utf-8")
            names = np.loadtxt(path, usecols=0, dtype=str, ndmin=1, comments=None, encoding="utf-8").tolist()
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    if not len(names) or len(names) != len(values) or not np.all(np.isfinite(values)):
        return None
    row_of = {name: row for row, name in enumerate(names)}
    if len(row_of) != len(names):
        return None  # a name listed twice
    lines = list(range(1, len(names) + 1))
    if b"\n\n" in path.read_bytes():  # blank lines: the row → line map needs the text
        text = path.read_text(encoding="utf-8").splitlines()
        lines = [n for n, line in enumerate(text, start=1) if line.split()]
    return FivePoints(path=path, names=names, points=values[:, :10].reshape(-1, 5, 2).copy(),
                      scores=values[:, 10].copy(), row_of=row_of, lines=lines)


__all__ = ["FivePoints", "read_five_points"]
