"""MXNet RecordIO: exact bytes on disk, multi-part records, IRHeader packing, random and sequential reads.

The reference for the bytes is an independent writer in this file, built from the format spec
alone (word by word, with struct), not from data_pipeline.recordio.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import idx_text
from data_pipeline.dataset import open_dataset
from data_pipeline.errors import DataFormatError
from data_pipeline.recordio import (
    IR_SIZE,
    MAGIC,
    IRHeader,
    RecordReader,
    RecordWriter,
    encode_record,
    pack_record,
    read_index,
    unpack_record,
)
from tests.rec_fixtures import jpeg_bytes

SPEC_MAGIC = struct.pack("<I", 0xCED7230A)


# ------------------------------------------------------------------------------------------------
# An independent writer, from the spec: magic, lrecord = cflag<<29 | length, data, pad to 4 bytes;
# a payload word equal to the magic ends a part and is dropped (cflag 1 first, 2 middle, 3 last).
# ------------------------------------------------------------------------------------------------
def spec_encode(payload: bytes) -> bytes:
    parts: list[bytes] = []
    current = bytearray()
    whole_words = len(payload) // 4
    for w in range(whole_words):
        word = payload[4 * w:4 * w + 4]
        if word == SPEC_MAGIC:
            parts.append(bytes(current))
            current = bytearray()
        else:
            current += word
    current += payload[4 * whole_words:]
    parts.append(bytes(current))
    out = bytearray()
    for i, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if i == len(parts) - 1 else 2
        out += struct.pack("<II", 0xCED7230A, (cflag << 29) | len(part)) + part
    out += b"\x00" * (-len(payload) % 4)
    return bytes(out)


def spec_payload(label: float | list[float], image: bytes, rid: int = 0, rid2: int = 0) -> bytes:
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, rid, rid2) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, label, rid, rid2) + image


def spec_write(directory: Path, records: list[tuple[int, bytes]], num_classes: int, size: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rec, idx = bytearray(), []
    for key, payload in records:
        idx.append(f"{key}\t{len(rec)}\n")
        rec += spec_encode(payload)
    (directory / "train.rec").write_bytes(bytes(rec))
    (directory / "train.idx").write_text("".join(idx))
    (directory / "property").write_text(f"{num_classes},{size},{size}")


def part_flags(encoded: bytes) -> list[tuple[int, int]]:
    """(cflag, length) of every part of one encoded record."""
    flags, pos = [], 0
    while pos < len(encoded):
        magic, lrec = struct.unpack_from("<II", encoded, pos)
        assert magic == MAGIC
        flags.append((lrec >> 29, lrec & ((1 << 29) - 1)))
        pos += 8 + (lrec & ((1 << 29) - 1))
        if flags[-1][0] in (0, 3):
            break
    return flags


EDGE_PAYLOADS = {
    "empty": b"",
    "one_byte": b"x",
    "three_bytes": b"xyz",
    "four_bytes": b"wxyz",
    "magic_only": SPEC_MAGIC,
    "magic_first": SPEC_MAGIC + b"tail-bytes",
    "magic_after_one_word": b"ABCD" + SPEC_MAGIC + b"EFGHIJ",
    "magic_last": b"ABCDEFGH" + SPEC_MAGIC,
    "two_magics_in_a_row": b"ABCD" + SPEC_MAGIC + SPEC_MAGIC + b"Z",
    "three_parts_and_padding": SPEC_MAGIC + b"12345678" + SPEC_MAGIC + b"abc",
    "magic_unaligned_1": b"A" + SPEC_MAGIC + b"BCD",
    "magic_unaligned_2": b"AB" + SPEC_MAGIC + b"CD",
    "magic_unaligned_3": b"ABC" + SPEC_MAGIC + b"D",
    "magic_straddling_tail": b"ABCDEF" + SPEC_MAGIC[:2],
}


# ------------------------------------------------------------------------------------------------
# Bytes on disk
# ------------------------------------------------------------------------------------------------
def test_plain_record_is_magic_length_payload_and_zero_padding() -> None:
    """A payload without the magic word is one part with cflag 0, padded to a multiple of 4."""
    assert encode_record(b"abcde") == SPEC_MAGIC + struct.pack("<I", 5) + b"abcde\x00\x00\x00"
    assert encode_record(b"") == SPEC_MAGIC + struct.pack("<I", 0)


@pytest.mark.parametrize("name", sorted(EDGE_PAYLOADS))
def test_encoding_matches_the_independent_spec_writer(name: str) -> None:
    """Splitting at aligned magic words (and only there) produces the spec's bytes exactly."""
    assert encode_record(EDGE_PAYLOADS[name]) == spec_encode(EDGE_PAYLOADS[name])


def test_aligned_magic_words_split_into_first_middle_last_parts() -> None:
    """cflag 1/2/3 parts with the magic words dropped; empty parts where magics touch the ends."""
    assert part_flags(encode_record(SPEC_MAGIC + b"12345678" + SPEC_MAGIC + b"abc")) == [(1, 0), (2, 8), (3, 3)]
    assert part_flags(encode_record(b"ABCD" + SPEC_MAGIC + SPEC_MAGIC + b"Z")) == [(1, 4), (2, 0), (3, 1)]
    assert part_flags(encode_record(b"ABCDEFGH" + SPEC_MAGIC)) == [(1, 8), (3, 0)]
    assert part_flags(encode_record(b"AB" + SPEC_MAGIC + b"CD")) == [(0, 8)]  # unaligned: not split


@pytest.fixture
def edge_files(tmp_path: Path) -> tuple[Path, Path, list[tuple[int, bytes]]]:
    """Every edge payload plus a 3 MB one, written with RecordWriter; checks the .idx lines it wrote."""
    rng = np.random.default_rng(0)
    large = bytearray(rng.integers(0, 256, size=3 * 1024 * 1024 + 3, dtype=np.uint8).tobytes())
    for pos in (0, 4096, 1_000_001, len(large) - 7):  # aligned and unaligned magic words
        large[pos:pos + 4] = SPEC_MAGIC
    records = [(k, p) for k, p in enumerate(EDGE_PAYLOADS.values())] + [(1000, bytes(large))]
    rec, idx = tmp_path / "edge.rec", tmp_path / "edge.idx"
    with RecordWriter(rec, idx) as writer:
        offsets = [writer.write(key, payload) for key, payload in records]
    assert idx.read_text() == "".join(f"{k}\t{o}\n" for (k, _), o in zip(records, offsets, strict=True))
    return rec, idx, records


def test_writer_output_is_byte_identical_to_the_spec_writer(edge_files: tuple[Path, Path, list]) -> None:
    """Whole file: records back to back, each as the spec encodes it; offsets in the .idx."""
    rec, _, records = edge_files
    assert rec.read_bytes() == b"".join(spec_encode(p) for _, p in records)


def test_round_trip_of_edge_payloads_by_key_and_by_scan(edge_files: tuple[Path, Path, list]) -> None:
    """Empty, tiny, magic-laden (aligned and not) and multi-megabyte payloads come back byte-exact."""
    rec, idx, records = edge_files
    with RecordReader(rec, idx) as reader:
        assert reader.keys.tolist() == [k for k, _ in records]
        for key, payload in records:
            assert reader.read(key) == payload, key
            assert reader.read_prefix(key, 10) == payload[:10], key
        scanned = list(reader.scan())
        assert [p for _, p in scanned] == [p for _, p in records]
        assert [o for o, _ in scanned] == [reader.offset(k) for k, _ in records]
        assert reader.check_index() == len(records)
    with RecordReader(rec) as sequential:  # no index: scan still works, keyed access is refused
        assert len(list(sequential.scan())) == len(records)
        with pytest.raises(ValueError, match="without an"):
            sequential.read(0)


def test_index_keys_keep_file_order_and_look_up_out_of_order(tmp_path: Path) -> None:
    """Keys need not be sorted or start at 0; lookups by key still find the right record."""
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with RecordWriter(rec, idx) as writer:
        for key in (7, 3, 42, 0):
            writer.write(key, f"payload {key}".encode())
    keys, offsets = read_index(idx)
    assert keys.dtype == np.int64 and keys.tolist() == [7, 3, 42, 0]
    with RecordReader(rec, idx) as reader:
        assert [reader.read(k) for k in (0, 3, 7, 42)] == [f"payload {k}".encode() for k in (0, 3, 7, 42)]
        assert reader.offset(3) == int(offsets[1]) and 5 not in reader
        with pytest.raises(KeyError, match="key 5"):
            reader.read(5)


@pytest.mark.parametrize("chunk_bytes", [1 << 21, 64, 29])  # chunks of whole lines, also one line each
def test_the_array_parser_reads_an_index_as_the_string_parser_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   chunk_bytes: int) -> None:
    """The canonical index (``<digits>\\t<digits>\\n``, as MXNet and fr_pack write it) is parsed with
    array operations (~16 bytes a line kept, issue 23); the result equals the string parser's, to
    offsets of 18 digits, over any chunking."""
    monkeypatch.setattr(idx_text, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(23)
    keys = rng.permutation(5000) * 7 + 1
    offsets = np.sort(rng.integers(0, 10**17, 5000))
    offsets[[0, -1]] = 0, 999_999_999_999_999_999
    idx = tmp_path / "x.idx"
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets, strict=True)))
    raw = np.fromfile(idx, dtype=np.uint8)
    assert np.array_equal(idx_text._parse_canonical_index(raw), idx_text._parse_index_text(idx, raw))
    got_keys, got_offsets = read_index(idx)
    assert got_keys.tolist() == keys.tolist() and got_offsets.tolist() == offsets.tolist()


@pytest.mark.parametrize(("text", "problem"), [
    ("0\t0\r\n1\t8\r\n", None),  # CRLF: not canonical; the string parser reads it
    ("0\t0\n1\t8", None),  # no final newline
    ("0\t0\n1 8\n", "line 2: expected 'key<TAB>offset' (two integers), got '1 8'"),
    ("0\t0\n1\t-8\n", "line 2: negative offset -8"),
    ("0\t0\n\t8\n", "line 2: expected 'key<TAB>offset'"),
    ("0\t0\n0\t8\n", "lines 1 and 2: key 0 appears twice"),
    ("0\t0\n1\t99999999999999999999\n", "could not be parsed"),  # past int64
])
def test_an_index_that_is_not_canonical_is_read_or_refused_naming_the_line(tmp_path: Path, text: str,
                                                                            problem: str | None) -> None:
    idx = tmp_path / "x.idx"
    idx.write_bytes(text.encode())
    if problem is None:
        keys, offsets = read_index(idx)
        assert keys.tolist() == [0, 1] and offsets.tolist() == [0, 8]
    else:
        with pytest.raises(DataFormatError, match=re.escape(problem)):
            read_index(idx)


def test_writer_refuses_duplicate_keys_and_oversized_payloads(tmp_path: Path) -> None:
    with RecordWriter(tmp_path / "d.rec", tmp_path / "d.idx") as writer:
        writer.write(5, b"a")
        writer.write(9, b"b")
        with pytest.raises(ValueError, match="key 5 was already written"):
            writer.write(5, b"c")
    huge = np.zeros(1 << 29, dtype=np.uint8)  # calloc'd: no memory is touched
    with pytest.raises(ValueError, match="2\\*\\*29"):
        encode_record(memoryview(huge))


# ------------------------------------------------------------------------------------------------
# IRHeader
# ------------------------------------------------------------------------------------------------
def test_pack_record_scalar_label_matches_struct_layout() -> None:
    """flag 0: the label is the header's float field; the image follows the 24-byte header."""
    payload = pack_record(IRHeader(0, 3.0, 17, 4), b"IMG")
    assert payload == spec_payload(3.0, b"IMG", 17, 4) and IR_SIZE == 24
    header, image = unpack_record(payload)
    assert header == IRHeader(0, 3.0, 17, 4) and image == b"IMG"


def test_pack_record_multi_label_stores_float32_labels_after_header() -> None:
    """flag n: n float32 labels follow the header, whose own label field is 0."""
    payload = pack_record(IRHeader(3, (1.0, 2.5, -4.0), 9, 0), b"JPEG")
    assert payload == spec_payload([1.0, 2.5, -4.0], b"JPEG", 9)
    assert struct.unpack_from("<f", payload, 4)[0] == 0.0
    header, image = unpack_record(payload)
    assert header == IRHeader(3, (1.0, 2.5, -4.0), 9, 0) and image == b"JPEG"


def test_pack_record_refuses_flag_that_disagrees_with_label() -> None:
    with pytest.raises(ValueError, match="flag 0"):
        pack_record(IRHeader(2, 1.0, 0, 0))
    with pytest.raises(ValueError, match="number of labels"):
        pack_record(IRHeader(0, (1.0, 2.0), 0, 0))


def test_unpack_record_rejects_payloads_shorter_than_their_header() -> None:
    with pytest.raises(ValueError, match="fewer than the 24-byte IRHeader"):
        unpack_record(b"short", path="f.rec", where="key 3")
    with pytest.raises(ValueError, match="5 float32 labels"):
        unpack_record(struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\x00" * 8)


# ------------------------------------------------------------------------------------------------
# Files from the independent writer, both layouts
# ------------------------------------------------------------------------------------------------
def test_reader_reads_independently_written_insightface_dataset(tmp_path: Path) -> None:
    """Header record, images (one split by a magic word in its IRHeader id), identity records."""
    images = [(0, jpeg_bytes(1)), (0, jpeg_bytes(2)), (1, jpeg_bytes(3)), (2, jpeg_bytes(4)), (2, jpeg_bytes(5))]
    first, end = 1 + len(images), 1 + len(images) + 3
    records = [(0, spec_payload([float(first), float(end)], b""))]
    records += [(k, spec_payload(float(label), img, rid=MAGIC if k == 2 else k))
                for k, (label, img) in enumerate(images, start=1)]
    records += [(first + c, spec_payload([float(s), float(e)], b"", first + c))
                for c, (s, e) in enumerate([(1, 3), (3, 4), (4, 6)])]
    spec_write(tmp_path, records, 3, 16)
    assert part_flags(spec_encode(records[2][1]))[0] == (1, 8)  # the id field really split the record

    with open_dataset(tmp_path) as dataset:
        assert dataset.layout == "insightface"
        assert dataset.image_keys.tolist() == [1, 2, 3, 4, 5] and dataset.image_keys.dtype == np.int64
        assert (dataset.num_classes, dataset.image_size, len(dataset)) == (3, (16, 16), 5)
        for key, (label, img) in enumerate(images, start=1):
            assert dataset.read_image(key) == (label, img)
            assert dataset.label(key) == label
        assert dataset.labels().tolist() == [0, 0, 1, 2, 2]
        for key, payload in records:
            assert dataset.reader.read(key) == payload
        assert dataset.reader.check_index() == len(records)


def test_reader_reads_independently_written_im2rec_dataset(tmp_path: Path) -> None:
    """No header record, keys from 0; a multi-label record's class is its first label."""
    records = [(0, spec_payload(1.0, jpeg_bytes(10))), (1, spec_payload([0.0, 5.5], jpeg_bytes(11))),
               (2, spec_payload(1.0, jpeg_bytes(12) + SPEC_MAGIC))]
    spec_write(tmp_path, records, 2, 16)
    with open_dataset(tmp_path) as dataset:
        assert dataset.layout == "im2rec" and dataset.identity_range is None
        assert dataset.image_keys.tolist() == [0, 1, 2]
        assert [dataset.label(k) for k in (0, 1, 2)] == [1, 0, 1]
        assert dataset.read_image(2) == (1, jpeg_bytes(12) + SPEC_MAGIC)
        assert [dataset.reader.read(k) for k, _ in records] == [p for _, p in records]
