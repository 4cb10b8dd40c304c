"""Our RecordIO is MXNet's RecordIO: checked against MXNet 1.9.1 itself, in both directions.

MXNet cannot share the project's venv (it needs numpy < 1.24), so ``scripts/mxnet_env.sh`` builds
``.mxnet-venv`` and the scripts in ``tests/mxnet_side/`` run there as subprocesses; the two
interpreters exchange JSON files under ``tmp_path``.

(a) files our writer produces (raw records with multi-label headers and the magic number at
    aligned positions, and a full insightface data set from ``write_insightface_dataset``) are read
    by ``mx.recordio.MXIndexedRecordIO`` + ``mx.recordio.unpack`` with identical headers and bytes;
(b) files MXNet writes (``mx.recordio.pack`` / ``pack_img``, an insightface data set, an im2rec file)
    are read byte-exact by our reader, recognised by ``open_dataset``, and decoded by the DALI
    pipeline into the right labels and the pixels PIL decodes from the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_pipeline.dali import DaliConfig, DaliFaceIterator
from data_pipeline.dataset import open_dataset
from data_pipeline.pack import write_insightface_dataset
from data_pipeline.recordio import MAGIC, IRHeader, RecordReader, RecordWriter, pack_record, unpack_record

pytestmark = pytest.mark.mxnet

ROOT = Path(__file__).resolve().parents[1]
MXNET_SIDE = Path(__file__).resolve().parent / "mxnet_side"
MAGIC_BYTES = struct.pack("<I", MAGIC)
# The float32 whose bits are the magic number: as a label it puts the magic inside the IRHeader.
MAGIC_FLOAT = struct.unpack("<f", MAGIC_BYTES)[0]
# DALI's CPU decoder vs PIL, in 8-bit levels. PNG is lossless: must be exact. JPEG decoders may
# legally differ by a level or two (IDCT and chroma-upsampling choices); with DALI 2.4 and Pillow 13
# they agree exactly (measured max difference 0). More than that would be a wrong image.
JPEG_MAX_LEVELS = 2.0
JPEG_MEAN_LEVELS = 0.5
ENV_TIMEOUT_S = 900
MXNET_TIMEOUT_S = 180


# ------------------------------------------------------------------------------------------------
# The MXNet interpreter
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mxnet_python() -> Path:
    """The .mxnet-venv interpreter, built by scripts/mxnet_env.sh on first use (cached afterwards)."""
    try:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "mxnet_env.sh")], cwd=ROOT, capture_output=True,
                              text=True, timeout=ENV_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/mxnet_env.sh did not finish in {ENV_TIMEOUT_S}s")
    if done.returncode != 0:
        pytest.fail(f"scripts/mxnet_env.sh failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def run_mxnet(python: Path, script: str, *args: str | Path) -> None:
    """Run tests/mxnet_side/SCRIPT under MXNet's interpreter, isolated from the project's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), str(MXNET_SIDE / script), *map(str, args)], env=env, cwd=MXNET_SIDE,
                          capture_output=True, text=True, timeout=MXNET_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{script} failed under MXNet (exit {done.returncode}):\n{done.stderr[-4000:]}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_fields(header: IRHeader) -> dict[str, Any]:
    """An IRHeader in the JSON shape the MXNet scripts print (label: float, or list when flag > 0)."""
    label = list(header.label) if header.flag > 0 else header.label  # type: ignore[arg-type]
    return {"flag": header.flag, "label": label, "id": header.id, "id2": header.id2}


def class_of(rec: dict[str, Any]) -> int:
    """The class of an image record in MXNet's manifest: its label, or the first of its labels."""
    return int(rec["label"][0] if rec["flag"] > 0 else rec["label"])


def first_part_flag(rec_path: Path, offset: int) -> int:
    """The continuation flag of the first part at ``offset`` (non-zero: MXNet split the record)."""
    with open(rec_path, "rb") as f:
        f.seek(offset)
        magic, lrec = struct.unpack("<II", f.read(8))
    assert magic == MAGIC
    return lrec >> 29


# ------------------------------------------------------------------------------------------------
# (b) files written by MXNet
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mxnet_files(mxnet_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Data sets written by MXNet (raw edge cases, insightface, im2rec) and MXNet's manifest of them."""
    out = tmp_path_factory.mktemp("written_by_mxnet")
    manifest_path = out / "manifest.json"
    run_mxnet(mxnet_python, "write_with_mxnet.py", out, manifest_path)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["mxnet_version"] == "1.9.1"
    return manifest


def test_mxnet_fixture_really_contains_split_records(mxnet_files: dict[str, Any]) -> None:
    """Guard for the tests below: MXNet did split the records that hold an aligned magic number."""
    for name in ("raw", "insightface"):
        part = mxnet_files[name]
        split = [r["key"] for r in part["records"] if first_part_flag(Path(part["rec"]), r["offset"]) != 0]
        expected = [r["key"] for r in part["records"] if r["multipart"]]
        assert split == expected and split, name
    multi_label = [r["key"] for r in mxnet_files["raw"]["records"] if r["flag"] > 0]
    assert multi_label == [3, 14, 12]


@pytest.mark.parametrize("name", ["raw", "insightface", "im2rec"])
def test_our_reader_reads_mxnet_records_byte_exact(mxnet_files: dict[str, Any], name: str) -> None:
    """Keys (in .idx order), offsets, payloads, IRHeaders and image bytes equal what MXNet wrote."""
    part = mxnet_files[name]
    with RecordReader(part["rec"], part["idx"]) as reader:
        assert [int(k) for k in reader.keys] == part["keys"]
        for rec in part["records"]:
            key = rec["key"]
            assert reader.offset(key) == rec["offset"], key
            payload = reader.read(key)
            assert payload == base64.b64decode(rec["payload_b64"]), key
            header, image = unpack_record(payload)
            assert header_fields(header) == {f: rec[f] for f in ("flag", "label", "id", "id2")}, key
            assert (sha256(image), len(image)) == (rec["image_sha256"], rec["image_len"]), key
            for n in range(min(len(payload), 64) + 2):  # prefixes that end inside, at and past split points
                assert reader.read_prefix(key, n) == payload[:n], (key, n)


@pytest.mark.parametrize("name", ["raw", "insightface", "im2rec"])
def test_our_sequential_scan_and_index_check_accept_mxnet_files(mxnet_files: dict[str, Any], name: str) -> None:
    """Walking the .rec without the .idx finds exactly MXNet's records, and the .idx checks out."""
    part = mxnet_files[name]
    in_file_order = sorted(part["records"], key=lambda r: r["offset"])
    with RecordReader(part["rec"], part["idx"]) as reader:
        scanned = list(reader.scan())
        assert [off for off, _ in scanned] == [r["offset"] for r in in_file_order]
        assert [sha256(p) for _, p in scanned] == [r["payload_sha256"] for r in in_file_order]
        assert reader.check_index() == len(part["records"])


@pytest.mark.parametrize("name", ["raw", "insightface", "im2rec"])
def test_our_pack_record_equals_mxnet_pack(mxnet_files: dict[str, Any], name: str) -> None:
    """pack_record(header, image) reproduces mx.recordio.pack's payload byte for byte."""
    for rec in mxnet_files[name]["records"]:
        payload = base64.b64decode(rec["payload_b64"])
        label = tuple(rec["label"]) if rec["flag"] > 0 else rec["label"]
        image = payload[24 + 4 * rec["flag"]:]
        assert pack_record(IRHeader(rec["flag"], label, rec["id"], rec["id2"]), image) == payload, rec["key"]


@pytest.mark.parametrize("name", ["raw", "insightface", "im2rec"])
def test_our_writer_reproduces_mxnet_files_byte_for_byte(
    mxnet_files: dict[str, Any], name: str, tmp_path: Path
) -> None:
    """The same payloads in the same order give the identical .rec and .idx that MXNet wrote."""
    part = mxnet_files[name]
    rec_path, idx_path = tmp_path / "ours.rec", tmp_path / "ours.idx"
    with RecordWriter(rec_path, idx_path) as writer:
        offsets = [writer.write(r["key"], base64.b64decode(r["payload_b64"])) for r in part["records"]]
    assert offsets == [r["offset"] for r in part["records"]]
    assert rec_path.read_bytes() == Path(part["rec"]).read_bytes()
    assert idx_path.read_bytes() == Path(part["idx"]).read_bytes()


def test_open_dataset_detects_mxnet_insightface_layout_and_reads_it(mxnet_files: dict[str, Any]) -> None:
    """An insightface data set written by MXNet: layout, class count, image keys, labels and bytes."""
    part = mxnet_files["insightface"]
    counts = part["identity_counts"]
    images = [r for r in part["records"] if r["format"] in ("jpeg", "png")]
    with open_dataset(Path(part["rec"]).parent) as ds:
        assert ds.layout == "insightface"
        assert ds.num_classes == len(counts)
        assert [int(k) for k in ds.image_keys] == [r["key"] for r in images] == list(range(1, sum(counts) + 1))
        for rec in images:
            label, image = ds.read_image(rec["key"])
            assert label == ds.label(rec["key"]) == class_of(rec), rec["key"]
            assert sha256(image) == rec["image_sha256"], rec["key"]
        assert ds.labels().tolist() == [i for i, c in enumerate(counts) for _ in range(c)]


def test_open_dataset_detects_mxnet_im2rec_file_and_reads_it(mxnet_files: dict[str, Any]) -> None:
    """An im2rec file (no header record, keys in shuffled order, one record with two labels) is 'im2rec',
    every record is an image and its class is its (first) label."""
    part = mxnet_files["im2rec"]
    with open_dataset(Path(part["rec"]).parent) as ds:
        assert ds.layout == "im2rec"
        assert sorted(int(k) for k in ds.image_keys) == sorted(part["keys"])
        for rec in part["records"]:
            label, image = ds.read_image(rec["key"])
            assert label == ds.label(rec["key"]) == class_of(rec), rec["key"]
            assert sha256(image) == rec["image_sha256"], rec["key"]
        assert any(r["flag"] > 0 for r in part["records"])


def decoded_by_pil(image: bytes) -> np.ndarray:
    """HWC float32 RGB levels 0..255, as PIL decodes the bytes."""
    with Image.open(io.BytesIO(image)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("name", ["insightface", "im2rec"])
def test_dali_pipeline_yields_mxnet_images_with_their_labels_and_pixels(mxnet_files: dict[str, Any], name: str) -> None:
    """One DALI epoch over MXNet's file: every image exactly once, label = MXNet's label, pixels =
    PIL's decode of the same bytes normalised as (x-127.5)/127.5, either as is or mirrored (random
    flip), including the two images MXNet stored as multi-part records.

    Pixels: PNG must match exactly; JPEG within JPEG_MAX_LEVELS / JPEG_MEAN_LEVELS (see above).
    """
    part = mxnet_files[name]
    records = {r["key"]: r for r in part["records"] if r["format"] in ("jpeg", "png")}
    config = DaliConfig(batch_size=4, last_batch="pad", flip=True, random_shuffle=False, num_threads=1, seed=3)
    iterator = DaliFaceIterator(Path(part["rec"]).parent, config, rank=0, world_size=1)
    seen: list[int] = []
    for batch in iterator:
        assert (str(batch.images.dtype), str(batch.labels.dtype)) == ("torch.float32", "torch.int64")
        for i in range(batch.num_valid):
            key = int(batch.keys[i])
            rec = records[key]
            seen.append(key)
            assert int(batch.labels[i]) == class_of(rec), key
            payload = base64.b64decode(rec["payload_b64"])
            ref = decoded_by_pil(payload[24 + 4 * rec["flag"]:])
            got = batch.images[i].numpy().transpose(1, 2, 0) * 127.5 + 127.5  # back to levels, HWC
            err = {flipped: np.abs(got - (ref[:, ::-1] if flipped else ref)) for flipped in (False, True)}
            flipped = min(err, key=lambda f: float(err[f].max()))
            if rec["format"] == "png":
                assert float(err[flipped].max()) < 1e-3, (key, float(err[flipped].max()))
            else:
                assert float(err[flipped].max()) <= JPEG_MAX_LEVELS, (key, float(err[flipped].max()))
                assert float(err[flipped].mean()) <= JPEG_MEAN_LEVELS, (key, float(err[flipped].mean()))
            assert float(err[not flipped].max()) > 50, key  # the image is not symmetric: the flip is observable
    assert sorted(seen) == sorted(records)


# ------------------------------------------------------------------------------------------------
# (a) files written by us, read by MXNet
# ------------------------------------------------------------------------------------------------
def jpeg_bytes(seed: int, size: int = 112) -> bytes:
    """A small smooth random JPEG made with PIL (independent of MXNet's OpenCV encoder)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def with_jpeg_comment_magic(jpeg: bytes, image_offset: int) -> bytes:
    """Insert a JPEG COM segment holding the magic at a 4-byte-aligned payload position.

    ``image_offset`` is where the image starts in the record payload (24 for a flag-0 IRHeader).
    Decoders skip COM segments, so the picture is unchanged but the record must be split.
    """
    data_start = image_offset + 6  # SOI (2) + COM marker (2) + segment length (2)
    data = b"#" * ((-data_start) % 4) + MAGIC_BYTES + b" multi-part"
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(data)) + data + jpeg[2:]


def our_insightface_samples() -> list[tuple[int, bytes]]:
    """(label, image) sorted by label: 3 classes with 3, 1 and 2 images; one JPEG forces a split record."""
    return [
        (0, jpeg_bytes(10)),
        (0, with_jpeg_comment_magic(jpeg_bytes(11), 24)),
        (0, png_bytes(12)),
        (1, jpeg_bytes(13)),
        (2, png_bytes(14)),
        (2, jpeg_bytes(15)),
    ]


def our_raw_records() -> list[tuple[int, IRHeader, bytes]]:
    """Edge cases for the writer: aligned magic words (split records), multi-label headers, empty image."""
    m = MAGIC_BYTES
    return [
        (7, IRHeader(0, 3.0, 2**40 + 5, 17), b"\x00\x01\x02\x03" + m + b"abcd" + m + m + b"xy" + m + b"z"),
        (3, IRHeader(3, (1.5, -2.25, 1e6), 42, 0), b"hello"),
        (100, IRHeader(0, 0.0, 0, 0), m),
        (0, IRHeader(0, 1.0, 0, 0), b""),
        (13, IRHeader(0, MAGIC_FLOAT, MAGIC, MAGIC << 32), b"tail" + m),
        (14, IRHeader(2, (2.0, MAGIC_FLOAT), 1, 2), m + b"!"),
        (21, IRHeader(0, 5.0, 21, 0), jpeg_bytes(0)),
        (22, IRHeader(2, (6.0, 0.25), 22, 0), jpeg_bytes(1)),
    ]


@pytest.fixture(scope="module")
def ours_read_by_mxnet(mxnet_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Files written by our code and MXNet's JSON view of them."""
    out = tmp_path_factory.mktemp("written_by_us")
    raw_rec, raw_idx = out / "raw.rec", out / "raw.idx"
    with RecordWriter(raw_rec, raw_idx) as writer:
        raw_offsets = {key: writer.write(key, pack_record(h, img)) for key, h, img in our_raw_records()}
    face_dir = write_insightface_dataset(out / "insightface", our_insightface_samples(), num_classes=3,
                                         image_size=(112, 112))
    request = {
        "raw": {"idx": str(raw_idx), "rec": str(raw_rec)},
        "insightface": {"idx": str(face_dir / "train.idx"), "rec": str(face_dir / "train.rec"), "insightface": True},
    }
    (out / "request.json").write_text(json.dumps(request))
    run_mxnet(mxnet_python, "read_with_mxnet.py", out / "request.json", out / "mxnet_view.json")
    view = json.loads((out / "mxnet_view.json").read_text())
    return {"dir": out, "view": view, "raw_offsets": raw_offsets, "raw_rec": raw_rec, "face_dir": face_dir}


def test_mxnet_reads_our_raw_records_with_identical_headers_and_bytes(ours_read_by_mxnet: dict[str, Any]) -> None:
    """MXIndexedRecordIO + unpack see our keys, offsets, IRHeaders, payloads and image bytes exactly."""
    view = ours_read_by_mxnet["view"]["raw"]
    records = our_raw_records()
    assert view["keys"] == [key for key, _, _ in records]
    for key, header, image in records:
        got = view["records"][str(key)]
        assert got["offset"] == ours_read_by_mxnet["raw_offsets"][key], key
        assert {f: got[f] for f in ("flag", "label", "id", "id2")} == header_fields(header), key
        assert (got["image_sha256"], got["image_len"]) == (sha256(image), len(image)), key
        assert got["payload_sha256"] == sha256(pack_record(header, image)), key


def test_our_writer_splits_records_where_mxnet_expects_it(ours_read_by_mxnet: dict[str, Any]) -> None:
    """Guard: the records holding an aligned magic word were really written as multi-part records."""
    split = [key for key, offset in ours_read_by_mxnet["raw_offsets"].items()
             if first_part_flag(ours_read_by_mxnet["raw_rec"], offset) != 0]
    assert split == [7, 100, 13, 14]


def test_mxnet_reads_our_insightface_dataset_as_insightface_does(ours_read_by_mxnet: dict[str, Any]) -> None:
    """write_insightface_dataset's files, seen by MXNet: header [first_identity, end], images labelled
    with their class in input order, identity records with [start, end); arcface_torch's indexing of
    them yields our images and labels and mx.image.imdecode decodes every image."""
    view = ours_read_by_mxnet["view"]["insightface"]
    samples = our_insightface_samples()
    n, classes = len(samples), 3
    first_identity, end = n + 1, n + 1 + classes
    assert view["keys"] == list(range(end))
    records = view["records"]
    assert (records["0"]["flag"], records["0"]["label"]) == (2, [first_identity, end])
    assert records["0"]["image_len"] == 0
    for key, (label, image) in enumerate(samples, start=1):
        got = records[str(key)]
        assert (got["flag"], got["label"]) == (0, float(label)), key
        assert (got["image_sha256"], got["image_len"]) == (sha256(image), len(image)), key
    starts = [1, 4, 5, 7]  # from the class sizes 3, 1, 2
    for c in range(classes):
        got = records[str(first_identity + c)]
        assert (got["flag"], got["label"], got["image_len"]) == (2, [starts[c], starts[c + 1]], 0), c
    face = view["insightface"]
    assert face["imgidx"] == list(range(1, n + 1))
    assert face["labels"] == [float(label) for label, _ in samples]
    assert face["shapes"] == [[112, 112, 3]] * n
    assert (ours_read_by_mxnet["face_dir"] / "property").read_text().strip() == "3,112,112"


def test_our_insightface_writer_split_the_record_holding_the_magic(ours_read_by_mxnet: dict[str, Any]) -> None:
    """Guard: the image with an aligned magic in its JPEG comment went to disk as a multi-part record."""
    face_dir = ours_read_by_mxnet["face_dir"]
    offsets = dict(line.split("\t") for line in (face_dir / "train.idx").read_text().splitlines())
    split = [int(k) for k, off in offsets.items() if first_part_flag(face_dir / "train.rec", int(off)) != 0]
    assert split == [2]
