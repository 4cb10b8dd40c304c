"""Datasets open in the time of a memory map (issue 23): the ``.idx`` is parsed once into a CRC-checked
array file that every later open, on every rank, maps instead of parsing; a stale, damaged or racy
cache is never used; the epoch orders are pointwise permutations, so no per-epoch array exists."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import array_file, idx_text, index_cache
from data_pipeline.dataset import open_dataset
from data_pipeline.errors import DataFormatError
from data_pipeline.index_cache import cache_path, load_index
from data_pipeline.pack import write_insightface_dataset
from data_pipeline.recordio import RecordReader, RecordWriter
from data_pipeline.shuffle import Shuffle
from tests.rec_fixtures import jpeg_bytes


def _age(*paths: Path) -> None:
    """Date files back past the racy window: as a dataset packed before the run that opens it."""
    old = time.time_ns() - 60 * 10**9
    for path in paths:
        os.utime(path, ns=(old, old))


def _write_index(path: Path, keys: np.ndarray, offsets: np.ndarray) -> Path:
    path.write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist(), strict=True)))
    _age(path)
    return path


@pytest.fixture()
def shuffled_index(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(23)
    keys = rng.permutation(3000) * 3 + 2
    offsets = np.arange(3000, dtype=np.int64) * 1028
    return _write_index(tmp_path / "train.idx", keys, offsets), keys, offsets


# ------------------------------------------------------------------------------------------------
# The text format, written with array operations
# ------------------------------------------------------------------------------------------------
def test_index_lines_written_with_arrays_read_back_as_the_string_parser_reads_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    keys = np.concatenate([[0, 9, 10, 99, 100], rng.integers(0, 10**17, 2000)])
    offsets = np.concatenate([[0, 1, 10**17, 999_999_999_999_999_999, 4], rng.integers(0, 10**12, 2000)])
    text = idx_text.format_index_lines(keys, offsets)
    assert text == "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist(), strict=True)).encode()
    path = idx_text.write_index_text(tmp_path / "x.idx", keys, offsets)
    got_keys, got_offsets = idx_text.read_index(path)
    assert got_keys.tolist() == keys.tolist() and got_offsets.tolist() == offsets.tolist()
    with pytest.raises(ValueError, match=r"\[0, 10\^18\)"):
        idx_text.format_index_lines(np.array([-1]), np.array([0]))


# ------------------------------------------------------------------------------------------------
# The array file
# ------------------------------------------------------------------------------------------------
def test_an_array_file_maps_read_only_and_refuses_any_damage(tmp_path: Path) -> None:
    arrays = {"a": np.arange(10, dtype=np.int64), "b": np.array([1.5, -2.0], dtype=np.float32),
              "empty": np.zeros(0, dtype=np.int64), "grid": np.arange(6, dtype=np.int32).reshape(2, 3)}
    path = array_file.write_array_file(tmp_path / "x.arrays", {"format": "test/1"}, arrays)
    meta, got = array_file.read_array_file(path)  # type: ignore[misc]
    assert meta == {"format": "test/1"} and set(got) == set(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and np.array_equal(got[name], a)
        assert not got[name].flags.writeable and not got[name].flags.owndata  # a view of the map
    whole = path.read_bytes()
    data_start = len(whole) - 6 * 4  # the last array's bytes
    for damaged in (whole[:-1], whole + b"\0", whole[:data_start] + b"\1" + whole[data_start + 1:],
                    b"FRARRAY0" + whole[8:], whole[:12]):
        path.write_bytes(damaged)
        assert array_file.read_array_file(path) is None
    assert array_file.read_array_file(tmp_path / "absent") is None


# ------------------------------------------------------------------------------------------------
# The index cache
# ------------------------------------------------------------------------------------------------
def test_the_first_open_caches_the_index_and_later_opens_map_it_without_parsing(
        shuffled_index: tuple[Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    idx, keys, offsets = shuffled_index
    first = load_index(idx)
    assert first.cache == cache_path(idx) and cache_path(idx).is_file()
    order = np.argsort(keys)
    for got, want in ((first.keys, keys), (first.offsets, offsets), (first.sorted_keys, keys[order]),
                      (first.sorted_offsets, offsets[order])):
        assert np.array_equal(got, want) and not got.flags.owndata
    assert first.offset_of(int(keys[17])) == int(offsets[17]) and first.offset_of(1) == -1

    def no_parsing(path: object) -> None:
        raise AssertionError("a current cache must be mapped, not re-parsed")

    monkeypatch.setattr(index_cache, "read_index", no_parsing)
    again = load_index(idx)
    assert np.array_equal(again.sorted_keys, keys[order])


def test_a_changed_index_rebuilds_its_cache(shuffled_index: tuple[Path, np.ndarray, np.ndarray]) -> None:
    idx, keys, offsets = shuffled_index
    load_index(idx)
    _write_index(idx, keys[:100], offsets[:100] + 4)  # another index (the cache stamp holds size, mtime, inode)
    rebuilt = load_index(idx)
    assert len(rebuilt) == 100 and np.array_equal(rebuilt.offsets, offsets[:100] + 4)
    assert rebuilt.cache is not None


def test_a_damaged_cache_is_rebuilt_not_trusted(shuffled_index: tuple[Path, np.ndarray, np.ndarray]) -> None:
    idx, keys, offsets = shuffled_index
    load_index(idx)
    cache = cache_path(idx)
    damaged = bytearray(cache.read_bytes())
    damaged[-9] ^= 0x40  # one bit of the last sorted offset
    cache.write_bytes(bytes(damaged))
    got = load_index(idx)
    assert np.array_equal(got.sorted_offsets, offsets[np.argsort(keys)])
    assert array_file.read_array_file(cache) is not None  # and the cache is whole again


def test_an_index_written_within_the_racy_window_is_parsed_not_cached(tmp_path: Path) -> None:
    """A timestamp is only as fine as the kernel's tick: an index rewritten in place at the same size
    just after it was stamped would pass for the cached one, so a fresh index is not cached."""
    idx = tmp_path / "train.idx"
    idx.write_text("0\t0\n1\t8\n")
    got = load_index(idx)
    assert got.cache is None and got.keys.tolist() == [0, 1] and not cache_path(idx).exists()


def test_a_read_only_dataset_keeps_the_index_in_memory(shuffled_index: tuple[Path, np.ndarray, np.ndarray],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    idx, keys, _ = shuffled_index

    def read_only(path: object, meta: object, arrays: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(index_cache, "write_array_file", read_only)
    got = load_index(idx)
    assert got.cache is None and np.array_equal(got.keys, keys)


def test_a_bad_line_is_still_named_when_an_old_cache_exists(tmp_path: Path) -> None:
    idx = _write_index(tmp_path / "train.idx", np.arange(5), np.arange(5) * 8)
    load_index(idx)
    idx.write_text("0\t0\n1\t8\n2 16\n")
    _age(idx)
    with pytest.raises(DataFormatError, match=r"train\.idx: line 3: expected 'key<TAB>offset'"):
        load_index(idx)


def _open_in_child(args: tuple[str, object]) -> list[int]:
    idx, barrier = args
    barrier.wait()  # type: ignore[attr-defined]
    got = load_index(idx)
    return got.sorted_offsets.tolist()


def test_two_ranks_opening_a_dataset_first_at_once_both_read_it_whole(
        shuffled_index: tuple[Path, np.ndarray, np.ndarray]) -> None:
    idx, keys, offsets = shuffled_index
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = pool.map(_open_in_child, [(str(idx), barrier)] * 2)
    want = offsets[np.argsort(keys)].tolist()
    assert results == [want, want]
    assert load_index(idx).cache is not None
    assert sorted(p.name for p in idx.parent.iterdir()) == ["train.idx", "train.idx.cache"]  # no temporary left


# ------------------------------------------------------------------------------------------------
# The dataset and the reader on the cache
# ------------------------------------------------------------------------------------------------
def test_a_dataset_opens_on_the_mapped_index_and_reads_the_same_records(tmp_path: Path) -> None:
    samples = [(label, jpeg_bytes(seed=i)) for i, label in enumerate([0, 0, 1, 1, 1, 2])]
    directory = write_insightface_dataset(tmp_path / "ds", samples, 3, (32, 32))
    _age(directory / "train.idx")
    with open_dataset(directory) as fresh:
        assert fresh.reader._index is not None and fresh.reader._index.cache is not None
        assert fresh.image_keys.tolist() == [1, 2, 3, 4, 5, 6] and not fresh.image_keys.flags.owndata
        assert [fresh.read_image(k) for k in fresh.image_keys] == samples
    with open_dataset(directory) as mapped:
        assert mapped.labels().tolist() == [0, 0, 1, 1, 1, 2]


def test_an_insightface_index_missing_a_key_is_refused_naming_it(tmp_path: Path) -> None:
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        from data_pipeline.recordio import IRHeader, pack_record

        writer.write(0, pack_record(IRHeader(2, (3.0, 5.0), 0, 0)))
        for key in (1, 2):
            writer.write(key, pack_record(IRHeader(0, 0.0, key, 0), jpeg_bytes(seed=key)))
        writer.write(4, pack_record(IRHeader(2, (1.0, 3.0), 4, 0)))  # key 3 is missing
    (tmp_path / "property").write_text("2,32,32\n")
    _age(tmp_path / "train.idx")
    with RecordReader(tmp_path / "train.rec", tmp_path / "train.idx") as reader:
        assert reader.lists_all_keys_below(3) and not reader.lists_all_keys_below(5)
    with pytest.raises(DataFormatError, match=r"key 3: key 3 is missing"):
        open_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------
# Epoch orders without arrays
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_a_shuffle_visits_every_position_once(n: int) -> None:
    order = Shuffle(n, [7, 1])(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))


def test_a_shuffle_is_a_pure_function_of_its_seed_and_evaluates_pointwise() -> None:
    n = 10_007
    full = Shuffle(n, [3, 0])(np.arange(n))
    assert np.array_equal(Shuffle(n, [3, 0])(np.arange(5000, 5100)), full[5000:5100])  # a batch alone
    assert not np.array_equal(Shuffle(n, [3, 1])(np.arange(n)), full)  # another epoch, another order
    with pytest.raises(IndexError):
        Shuffle(n, [3, 0])(np.array([n]))


def test_shuffled_positions_look_uniform() -> None:
    """Where image 0 lands over 4,000 seeds, in 20 bins of a 1,000-image epoch: a chi-square statistic
    below 43.8 (p = 0.001 for 19 degrees of freedom), as for a uniformly random permutation."""
    n, seeds, bins = 1000, 4000, 20
    landing = [int(np.flatnonzero(Shuffle(n, [s])(np.arange(n)) == 0)[0]) for s in range(seeds)]
    counts = np.bincount(np.array(landing) * bins // n, minlength=bins)
    expected = seeds / bins
    assert ((counts - expected) ** 2 / expected).sum() < 43.8
