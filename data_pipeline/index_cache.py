"""The arrays of an ``.idx``, parsed once per dataset and memory-mapped by every rank after that.

WHY: every rank of every launch parsed the text index when it opened a dataset (issue 23: at
WebFace42M's 44.5M lines ~30 s and ~6 GB per rank with the string parser, ~20 s and ~2 GB with the
array parser). The first open writes ``<name>.idx.cache`` beside the index (data_pipeline/array_file.py:
one file, atomic, CRC-checked, memory-mapped); later opens map it, so the ranks of a node share one
copy in the page cache and open in the time the CRC check takes (~0.6 s at 44.5M lines here).

The cache is trusted only while it describes the index it was made from: the index's size,
modification time and inode are stored in it, and a cache whose stamp or CRC disagrees is rebuilt
(never used). Two ranks opening a dataset for the first time at once both parse it and both write the
cache; the rename makes one of the identical files win, and neither sees a partial file. Where the
index's folder cannot be written (a read-only dataset) the arrays are kept in memory, as before, and
:attr:`IndexArrays.cache` is None.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.array_file import read_array_file, write_array_file
from data_pipeline.errors import data_error
from data_pipeline.idx_text import read_index

CACHE_SUFFIX = ".cache"
_FORMAT = "fr_train.idx_cache/1"
RACY_NS = 2_000_000_000  # an index younger than this is parsed, not cached


@dataclass(frozen=True)
class IndexArrays:
    """An ``.idx`` as arrays: its lines in file order, and the same sorted by key for lookups."""

    keys: np.ndarray  # int64, file order
    offsets: np.ndarray  # int64, file order (aligned with keys)
    sorted_keys: np.ndarray  # int64, ascending (keys are unique)
    sorted_offsets: np.ndarray  # int64, the offset of each sorted key
    cache: Path | None  # the memory-mapped cache file, None when the arrays are private

    def __len__(self) -> int:
        return len(self.keys)

    def offset_of(self, key: int) -> int:
        """Byte offset of ``key``, or -1 when the index does not list it (O(log n), no allocation)."""
        i = int(np.searchsorted(self.sorted_keys, key))
        if i < len(self.sorted_keys) and int(self.sorted_keys[i]) == key:
            return int(self.sorted_offsets[i])
        return -1


def cache_path(idx_path: str | Path) -> Path:
    idx_path = Path(idx_path)
    return idx_path.with_name(idx_path.name + CACHE_SUFFIX)


def _stamp(idx_path: Path) -> dict[str, int]:
    try:
        st = idx_path.stat()
    except FileNotFoundError:
        raise data_error(idx_path, "", "index file not found",
                         "Pass the .idx written with the .rec (fr_pack writes train.idx next to train.rec)") from None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def sort_order(values: np.ndarray) -> np.ndarray | None:
    """The stable order that sorts ``values``, or None when they are sorted already (the usual case
    for a packed dataset: no n-element permutation is made)."""
    if len(values) < 2 or bool(np.all(values[1:] >= values[:-1])):
        return None
    return np.argsort(values, kind="stable")


def load_index(idx_path: str | Path) -> IndexArrays:
    """The arrays of ``idx_path``, from its cache when that is current, else parsed (and cached).

    Parse errors are those of :func:`data_pipeline.idx_text.read_index`: they name the line.
    """
    idx_path = Path(idx_path)
    stamp = _stamp(idx_path)  # before parsing: an index changed meanwhile leaves a cache that is stale
    cache = cache_path(idx_path)
    found = _mapped(cache, stamp)
    if found is not None:
        return found
    keys, offsets = read_index(idx_path)
    order = sort_order(keys)
    sorted_keys, sorted_offsets = (keys, offsets) if order is None else (keys[order], offsets[order])
    if time.time_ns() - stamp["mtime_ns"] < RACY_NS:
        return IndexArrays(keys, offsets, sorted_keys, sorted_offsets, None)
    try:
        write_array_file(cache, {"format": _FORMAT, "idx": stamp},
                         {"keys": keys, "offsets": offsets, "sorted_keys": sorted_keys, "sorted_offsets": sorted_offsets})
    except OSError:  # a read-only dataset: keep the parsed arrays
        return IndexArrays(keys, offsets, sorted_keys, sorted_offsets, None)
    mapped = _mapped(cache, stamp)  # the shared pages instead of this process's copy
    return mapped if mapped is not None else IndexArrays(keys, offsets, sorted_keys, sorted_offsets, None)


def _mapped(cache: Path, stamp: dict[str, int]) -> IndexArrays | None:
    found = read_array_file(cache)
    if found is None:
        return None
    meta, arrays = found
    if meta != {"format": _FORMAT, "idx": stamp}:
        return None
    try:
        return IndexArrays(arrays["keys"], arrays["offsets"], arrays["sorted_keys"], arrays["sorted_offsets"], cache)
    except KeyError:
        return None


__all__ = ["CACHE_SUFFIX", "RACY_NS", "IndexArrays", "cache_path", "load_index", "sort_order"]
