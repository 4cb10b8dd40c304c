"""Write RecordIO files with MXNet 1.9.1 itself (run by .mxnet-venv's interpreter, NOT the project's).

Usage: write_with_mxnet.py OUT_DIR MANIFEST_JSON

Writes three data sets under OUT_DIR, each as MXNet and insightface/im2rec produce them:
  raw/        raw.rec + raw.idx: edge-case records (multi-label headers, the RecordIO magic number at
              4-byte-aligned positions of the payload and of the header itself, which makes MXNet split
              the record into continuation parts; an empty image; non-sequential keys)
  insightface/ train.rec + train.idx + property: header record 0 with labels [first_identity, end],
              image records labelled with their identity, identity records holding [start, end)
  im2rec/     train.rec + train.idx + property: im2rec's layout (no header record; keys in shuffled order)
and a JSON manifest describing every record MXNet was asked to write: its key, the file offset MXNet
recorded, the IRHeader fields after mx.recordio.pack, and the full payload (base64) and image bytes
(sha256), so the project's reader can be checked byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import sys
import zlib

import cv2
import mxnet as mx
import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
# The float32 whose bit pattern is the magic number: used as a label so the magic sits in the header.
MAGIC_FLOAT = struct.unpack("<f", MAGIC_BYTES)[0]
IMAGE_SIZE = 112


def _image(rng: np.random.RandomState) -> np.ndarray:
    """A smooth random BGR image (low-resolution noise upsampled), so JPEG is neither trivial nor noise."""
    low = rng.randint(0, 256, size=(8, 8, 3)).astype(np.uint8)
    img = cv2.resize(low, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC)
    noise = rng.randint(-12, 13, size=img.shape)
    return np.clip(img.astype(np.int32) + noise, 0, 255).astype(np.uint8)


def _jpeg_with_magic(jpeg: bytes, image_offset: int) -> bytes:
    """Insert a JPEG comment (COM) segment holding the magic at a 4-byte-aligned payload position.

    ``image_offset`` is where the image bytes start in the record payload. Decoders skip COM
    segments, so the picture is unchanged while MXNet must split the record into parts.
    """
    data_start = image_offset + 6  # after SOI (2) + COM marker (2) + length (2)
    fill = b"#" * ((-data_start) % 4)
    data = fill + MAGIC_BYTES + b" fr_train multi-part test"
    segment = b"\xff\xfe" + struct.pack(">H", 2 + len(data)) + data
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]


def _png_with_magic(png: bytes, image_offset: int) -> bytes:
    """Insert a PNG tEXt chunk (after IHDR) holding the magic at a 4-byte-aligned payload position."""
    ihdr_end = 8 + 25  # signature + IHDR (length 4, type 4, data 13, crc 4)
    keyword = b"Comment\x00"
    text_start = image_offset + ihdr_end + 8 + len(keyword)
    data = keyword + b"#" * ((-text_start) % 4) + MAGIC_BYTES + b" fr_train multi-part test"
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    assert png[12:16] == b"IHDR"
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _has_aligned_magic(payload: bytes) -> bool:
    return any(payload[i:i + 4] == MAGIC_BYTES for i in range(0, len(payload) - 3, 4))


def _describe(key: int, offset: int, payload: bytes, fmt: str) -> dict:
    header, image = mx.recordio.unpack(payload)
    label = header.label
    return {
        "key": key,
        "offset": offset,
        "flag": int(header.flag),
        "label": [float(v) for v in label] if header.flag > 0 else float(label),
        "id": int(header.id),
        "id2": int(header.id2),
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "image_len": len(image),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_b64": base64.b64encode(payload).decode("ascii"),
        "format": fmt,
        "multipart": _has_aligned_magic(payload),
    }


def _write(rec_dir: str, stem: str, records: list[tuple[int, bytes, str]]) -> dict:
    """Write (key, payload, format) in the given order with MXIndexedRecordIO; return the manifest part."""
    os.makedirs(rec_dir, exist_ok=True)
    idx_path, rec_path = os.path.join(rec_dir, stem + ".idx"), os.path.join(rec_dir, stem + ".rec")
    writer = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, "w")
    described = []
    for key, payload, fmt in records:
        writer.write_idx(key, payload)
        described.append((key, payload, fmt))
    writer.close()
    # MXIndexedRecordIO keeps key -> offset after writing; read them back from its index file too.
    reader = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
    out = [_describe(key, reader.idx[key], payload, fmt) for key, payload, fmt in described]
    for rec in out:
        got = reader.read_idx(rec["key"])
        assert hashlib.sha256(got).hexdigest() == rec["payload_sha256"], f"MXNet re-read key {rec['key']}"
    reader.close()
    return {"idx": idx_path, "rec": rec_path, "keys": [k for k, _, _ in records], "records": out}


def raw_records(rng: np.random.RandomState) -> list[tuple[int, bytes, str]]:
    m = MAGIC_BYTES
    pack, header = mx.recordio.pack, mx.recordio.IRHeader
    return [
        # Magic at aligned image offsets 4, 12, 16 (two in a row → an empty part) and unaligned at 22.
        (7, pack(header(0, 3.0, 2**40 + 5, 17), b"\x00\x01\x02\x03" + m + b"abcd" + m + m + b"xy" + m + b"z"), "bytes"),
        # Multi-label header (flag=3 set by pack) and an odd-length image (exercises the padding).
        (3, pack(header(0, [1.5, -2.25, 1e6], 42, 0), b"hello"), "bytes"),
        # Payload ending in an aligned magic: the last continuation part is empty.
        (100, pack(header(0, 0.0, 0, 0), m), "bytes"),
        # Empty image: the payload is the bare 24-byte header.
        (0, pack(header(0, 1.0, 0, 0), b""), "bytes"),
        # The magic inside the IRHeader itself: label bits (offset 4), id low word (8), id2 high word (20).
        (13, pack(header(0, MAGIC_FLOAT, MAGIC, MAGIC << 32), b"tail" + m), "bytes"),
        # Multi-label header whose float labels hold the magic at an aligned offset.
        (14, pack(header(0, [2.0, MAGIC_FLOAT], 1, 2), m + b"!"), "bytes"),
        (11, mx.recordio.pack_img(header(0, 4.0, 11, 0), _image(rng), quality=90, img_fmt=".jpg"), "jpeg"),
        (12, mx.recordio.pack_img(header(0, [4.0, 0.5], 12, 0), _image(rng), quality=3, img_fmt=".png"), "png"),
    ]


def insightface_records(rng: np.random.RandomState, counts: list[int]) -> list[tuple[int, bytes, str]]:
    """insightface's layout: header 0, images 1..n (sorted by identity), identity records n+1..n+C."""
    pack, header = mx.recordio.pack, mx.recordio.IRHeader
    n_images = sum(counts)
    first_identity = n_images + 1
    end = first_identity + len(counts)
    records: list[tuple[int, bytes, str]] = [(0, pack(header(2, [first_identity, end], 0, 0), b""), "header")]
    key = 1
    for identity, count in enumerate(counts):
        for _ in range(count):
            # Alternate PNG (lossless: DALI must match PIL exactly) and JPEG (what real sets hold).
            fmt = ".png" if key % 2 else ".jpg"
            quality = 3 if fmt == ".png" else 90
            head = header(0, float(identity), key, 0)
            payload = mx.recordio.pack_img(head, _image(rng), quality, fmt)
            if key in (2, 3):  # real images whose bytes hold an aligned magic: multi-part records
                _, image = mx.recordio.unpack(payload)
                image = _jpeg_with_magic(image, 24) if fmt == ".jpg" else _png_with_magic(image, 24)
                payload = pack(head, image)
                assert _has_aligned_magic(payload)
            records.append((key, payload, fmt[1:].replace("jpg", "jpeg")))
            key += 1
    start = 1
    for identity, count in enumerate(counts):
        records.append((first_identity + identity, pack(header(2, [start, start + count], 0, 0), b""), "identity"))
        start += count
    return records


def im2rec_records(rng: np.random.RandomState) -> list[tuple[int, bytes, str]]:
    """im2rec's layout: IRHeader(0, label, key, 0) + JPEG per image; with --shuffle the keys are out of order.

    Key 4 carries two labels [class, extra], as im2rec --pack-label writes them (the class comes first).
    """
    order = [3, 0, 5, 1, 4, 2]
    records = []
    for key in order:
        label = [float(key % 3), 0.75] if key == 4 else float(key % 3)
        payload = mx.recordio.pack_img(mx.recordio.IRHeader(0, label, key, 0), _image(rng), 95, ".jpg")
        records.append((key, payload, "jpeg"))
    return records


def main(out_dir: str, manifest_path: str) -> None:
    rng = np.random.RandomState(1234)
    counts = [2, 3, 1, 4]
    manifest = {
        "mxnet_version": mx.__version__,
        "magic_float": MAGIC_FLOAT,
        "raw": _write(os.path.join(out_dir, "raw"), "raw", raw_records(rng)),
        "insightface": _write(os.path.join(out_dir, "insightface"), "train", insightface_records(rng, counts)),
        "im2rec": _write(os.path.join(out_dir, "im2rec"), "train", im2rec_records(rng)),
    }
    manifest["insightface"]["identity_counts"] = counts
    # The property file (num_classes,height,width): insightface ships one; for im2rec the user writes it.
    for name, num_classes in (("insightface", len(counts)), ("im2rec", 3)):
        with open(os.path.join(out_dir, name, "property"), "w") as f:
            f.write(f"{num_classes},{IMAGE_SIZE},{IMAGE_SIZE}\n")
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
