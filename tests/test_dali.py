"""Specification of the DALI input pipeline (CPU pipelines; the GPU path differs only in the decoder).

Datasets are tiny (32x32 noise JPEGs, ~100 images) and written with the project's own writers.
Several ranks are simulated in one process: a DALI shard depends only on (shard_id, num_shards),
not on which process reads it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from data_pipeline.dali import (
    ARRAYS_NAME,
    IMAGE_INDEX_NAME,
    META_NAME,
    DaliConfig,
    DaliFaceIterator,
    load_dali_index,
    prepare_dali_index,
)
from data_pipeline.dataset import open_dataset
from data_pipeline.errors import DataFormatError
from data_pipeline.pack import write_insightface_dataset
from data_pipeline.recordio import IRHeader, RecordWriter, pack_record

SIZE = 32
NUM_CLASSES = 13
# 101 images (prime): shards of 2 and 3 ranks differ in size, so padding and drop both matter.
PER_CLASS = [9, 8, 7, 8, 9, 7, 8, 8, 7, 9, 8, 6, 7]
MAGIC = b"\x0a\x23\xd7\xce"  # RecordIO magic as it appears on disk (little-endian 0xced7230a)


def noise_jpeg(rng: np.random.Generator, size: int = SIZE, with_magic: bool = False) -> bytes:
    """A random RGB JPEG (4:4:4, so decoders agree bit for bit); optionally with the RecordIO magic
    word inside a COM segment at a 4-byte-aligned payload position, forcing a multi-part record."""
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, subsampling=0)
    data = buf.getvalue()
    if with_magic:
        # payload = 24-byte IRHeader + JPEG; COM data starts at JPEG byte 6 → payload byte 30; magic at 32.
        body = b"xx" + MAGIC + b"yy"
        data = data[:2] + b"\xff\xfe" + (2 + len(body)).to_bytes(2, "big") + body + data[2:]
    return data


def samples(seed: int = 0, magic_every: int = 0) -> list[tuple[int, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for label, count in enumerate(PER_CLASS):
        for _ in range(count):
            out.append((label, noise_jpeg(rng, with_magic=bool(magic_every) and len(out) % magic_every == 0)))
    return out


@pytest.fixture(scope="module")
def insightface_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """insightface layout: header record 0, images 1..101, identity records 102..114 at the end."""
    return write_insightface_dataset(tmp_path_factory.mktemp("insightface"), samples(magic_every=10),
                                     NUM_CLASSES, (SIZE, SIZE))


@pytest.fixture(scope="module")
def im2rec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """im2rec layout: every record is an image, keys from 0, no header and no identity records."""
    out = tmp_path_factory.mktemp("im2rec")
    with RecordWriter(out / "train.rec", out / "train.idx") as writer:
        for key, (label, image) in enumerate(samples(seed=1)):
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), image))
    (out / "property").write_text(f"{NUM_CLASSES},{SIZE},{SIZE}\n")
    return out


def config(**overrides: object) -> DaliConfig:
    base: dict[str, object] = dict(batch_size=8, last_batch="pad", num_threads=1, initial_fill=16, seed=7)
    base.update(overrides)
    return DaliConfig(**base)  # type: ignore[arg-type]


def make_iterators(directory: Path, world: int, **overrides: object) -> list[DaliFaceIterator]:
    """One iterator per rank (the small shuffle window's warning is the subject of its own test)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*sorted by label", category=UserWarning)
        return [DaliFaceIterator(directory, config(**overrides), rank=r, world_size=world) for r in range(world)]


def epoch_keys(iterators: list[DaliFaceIterator]) -> list[list[int]]:
    """One epoch of every rank: the keys of the *valid* samples of each rank."""
    out = []
    for it in iterators:
        keys: list[int] = []
        for batch in it:
            assert batch.images.shape[0] == it.config.batch_size  # never a short batch
            keys.extend(batch.keys[: batch.num_valid].tolist())
        out.append(keys)
    return out


def reference_chw(image: bytes) -> np.ndarray:
    """PIL decode → (x − 127.5) / 127.5, CHW, float64."""
    with Image.open(io.BytesIO(image)) as decoded:
        rgb = np.asarray(decoded.convert("RGB"), dtype=np.float64)
    return ((rgb - 127.5) / 127.5).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# The image-only index
# ---------------------------------------------------------------------------------------------
def test_image_index_lists_exactly_the_image_records_in_file_order(insightface_dir: Path) -> None:
    """Header (key 0) and identity records are absent; offsets are those of train.idx, ascending."""
    index = load_dali_index(insightface_dir)
    with open_dataset(insightface_dir) as ds:
        assert ds.layout == "insightface"
        np.testing.assert_array_equal(np.sort(index.keys), ds.image_keys)
        assert all(index.offsets[i] == ds.reader.offset(int(k)) for i, k in enumerate(index.keys))
        np.testing.assert_array_equal(index.labels, [ds.label(int(k)) for k in index.keys])
        first_identity, end = ds.identity_range  # type: ignore[misc]
        identity_bytes = ds.reader.size - ds.reader.offset(first_identity)
    assert np.all(np.diff(index.offsets) > 0)
    words = np.fromfile(insightface_dir / "train.rec", dtype="<u4")
    assert np.count_nonzero(words[index.offsets // 4 + 1] >> 29 == 1) == 11  # multi-part images are covered
    lines = (insightface_dir / IMAGE_INDEX_NAME).read_text().splitlines()
    assert lines == [f"{k}\t{o}" for k, o in zip(index.keys, index.offsets, strict=True)]
    # The identity records are exactly the bytes behind the last image: the tail of its DALI range.
    assert index.tail_bytes == identity_bytes > 0 and end - first_identity == NUM_CLASSES


def test_prepare_is_idempotent_and_rebuilds_when_the_rec_or_its_outputs_change(tmp_path: Path) -> None:
    """A current index is reused untouched; a changed .rec or a tampered output is rebuilt."""
    directory = write_insightface_dataset(tmp_path / "ds", samples()[:30], 4, (SIZE, SIZE))
    meta = directory / META_NAME
    stamp = meta.stat().st_mtime_ns
    assert prepare_dali_index(directory) == directory / IMAGE_INDEX_NAME
    assert meta.stat().st_mtime_ns == stamp  # reused
    (directory / IMAGE_INDEX_NAME).write_text("1\t0\n")  # tampered output → rebuilt
    prepare_dali_index(directory)
    assert len((directory / IMAGE_INDEX_NAME).read_text().splitlines()) == 30
    os.utime(directory / "train.rec", ns=(1, 1))  # the .rec changed (mtime) → rebuilt with the new stamp
    prepare_dali_index(directory)
    assert json.loads(meta.read_text())["rec"]["mtime_ns"] == 1
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]  # no temporary files left


def test_prepare_can_write_the_index_outside_a_read_only_dataset(tmp_path: Path, insightface_dir: Path) -> None:
    out = tmp_path / "cache"
    path = prepare_dali_index(insightface_dir, out)
    assert path == out / IMAGE_INDEX_NAME and (out / ARRAYS_NAME).is_file() and (out / META_NAME).is_file()
    assert path.read_text() == (insightface_dir / IMAGE_INDEX_NAME).read_text()


def test_non_image_record_between_images_is_refused_with_its_key(tmp_path: Path) -> None:
    """insightface layout whose identity record (key 3) was written between the images (keys 1, 2):
    DALI would read it as part of image 1's byte range, so the index is refused."""
    rng = np.random.default_rng(3)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(IRHeader(2, (3.0, 4.0), 0, 0)))
        writer.write(1, pack_record(IRHeader(0, 0.0, 1, 0), noise_jpeg(rng)))
        writer.write(3, pack_record(IRHeader(2, (1.0, 3.0), 3, 0)))
        writer.write(2, pack_record(IRHeader(0, 0.0, 2, 0), noise_jpeg(rng)))
    (tmp_path / "property").write_text(f"1,{SIZE},{SIZE}\n")
    with pytest.raises(DataFormatError, match=r"key 3 \(byte offset \d+\).*between image records.*image key 1"):
        prepare_dali_index(tmp_path)


def test_unindexed_bytes_after_the_images_are_refused(tmp_path: Path) -> None:
    """Bytes the index does not account for would silently become part of the last image's range."""
    rng = np.random.default_rng(3)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), noise_jpeg(rng)))
        writer.write(1, pack_record(IRHeader(0, 1.0, 1, 0), noise_jpeg(rng)))
    (tmp_path / "property").write_text(f"2,{SIZE},{SIZE}\n")
    (tmp_path / "train.idx").write_text((tmp_path / "train.idx").read_text().splitlines()[0] + "\n")
    with pytest.raises(DataFormatError, match=r"train\.rec: byte offset \d+: \d+ bytes after the last indexed record"):
        prepare_dali_index(tmp_path)


def test_image_record_without_image_bytes_is_refused(tmp_path: Path) -> None:
    """An im2rec file whose records carry no image would hand DALI's decoder an empty buffer (#2235)."""
    rng = np.random.default_rng(4)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), noise_jpeg(rng)))
        writer.write(1, pack_record(IRHeader(0, 1.0, 1, 0)))
    (tmp_path / "property").write_text(f"2,{SIZE},{SIZE}\n")
    with pytest.raises(DataFormatError, match=r"image key 1 \(byte offset \d+\).*no image bytes"):
        prepare_dali_index(tmp_path)


def test_label_outside_num_classes_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in range(3):
            writer.write(key, pack_record(IRHeader(0, float(key), key, 0), noise_jpeg(rng)))
    (tmp_path / "property").write_text(f"2,{SIZE},{SIZE}\n")
    with pytest.raises(DataFormatError, match=r"image key 2 .*not below num_classes=2"):
        prepare_dali_index(tmp_path)


# ---------------------------------------------------------------------------------------------
# Epochs, shards and the last batch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_pad_epoch_yields_every_image_exactly_once_across_ranks(insightface_dir: Path, world: int) -> None:
    """With last_batch='pad', the valid samples of all ranks are the 101 images, each once, in
    two consecutive epochs (DALI rotates the shards between epochs); the padding repeats a
    sample the rank already returned."""
    iterators = make_iterators(insightface_dir, world)
    all_keys = sorted(int(k) for k in load_dali_index(insightface_dir).keys)
    expected_len = math.ceil(math.ceil(101 / world) / 8)
    assert [len(it) for it in iterators] == [expected_len] * world
    for _epoch in range(2):
        per_rank = epoch_keys(iterators)
        assert sorted(k for keys in per_rank for k in keys) == all_keys
    for it in iterators:
        for batch in it:
            assert 0 <= batch.num_valid <= 8
            pad = batch.keys[batch.num_valid:]
            assert torch.all(pad == batch.keys[batch.num_valid - 1]) if batch.num_valid else True


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_epoch_yields_only_full_batches_of_distinct_real_images(insightface_dir: Path, world: int) -> None:
    """With last_batch='drop', every rank yields floor(floor(N/W)/B) batches, all valid, no image twice."""
    iterators = make_iterators(insightface_dir, world, last_batch="drop")
    assert [len(it) for it in iterators] == [(101 // world) // 8] * world
    for _epoch in range(2):
        batches = [list(it) for it in iterators]
        assert all(b.num_valid == 8 for rank in batches for b in rank)
        keys = [int(k) for rank in batches for b in rank for k in b.keys]
        assert len(keys) == len(set(keys)) == world * len(iterators[0]) * 8


def test_im2rec_layout_without_header_is_read_completely(im2rec_dir: Path) -> None:
    """Keys start at 0 and there is no header: key 0 is an image and must not be skipped."""
    iterators = make_iterators(im2rec_dir, 2)
    assert load_dali_index(im2rec_dir).layout == "im2rec"
    assert sorted(k for keys in epoch_keys(iterators) for k in keys) == list(range(101))


def test_reset_starts_a_new_epoch_with_a_different_order(insightface_dir: Path) -> None:
    (it,) = make_iterators(insightface_dir, 1)
    first = epoch_keys([it])[0]
    assert it.epoch == 0
    second = epoch_keys([it])[0]  # the next `for` resets by itself
    assert it.epoch == 1 and sorted(first) == sorted(second) and first != second
    next(iter(it))  # one batch of epoch 2, then abandon the rest of it
    it.reset()
    assert it.epoch == 3 and sorted(epoch_keys([it])[0]) == sorted(first)


# ---------------------------------------------------------------------------------------------
# Content: labels, normalisation, layout, flips
# ---------------------------------------------------------------------------------------------
def test_images_are_normalised_nchw_and_labels_int64_per_record(insightface_dir: Path) -> None:
    """Without flips every sample equals (PIL decode − 127.5)/127.5 in CHW, and its int64 label is
    the class the record's IRHeader holds (via the project's reader). Covers multi-part records
    (magic word inside the JPEG) and the last image, whose DALI range ends in identity records."""
    (it,) = make_iterators(insightface_dir, 1, flip=False)
    seen = set()
    with open_dataset(insightface_dir) as ds:
        last_image = int(ds.image_keys[-1])
        for batch in it:
            assert batch.images.dtype == torch.float32 and batch.images.shape == (8, 3, SIZE, SIZE)
            assert batch.labels.dtype == torch.int64 and batch.images.is_contiguous()
            for i in range(batch.num_valid):
                key = int(batch.keys[i])
                label, image = ds.read_image(key)
                assert int(batch.labels[i]) == label
                np.testing.assert_allclose(batch.images[i].numpy(), reference_chw(image), rtol=0, atol=1e-6)
                seen.add(key)
    assert last_image in seen and len(seen) == 101


def test_flips_are_exact_mirrors_of_about_half_the_samples(insightface_dir: Path) -> None:
    """Same order (no shuffle): each flipped sample is bit-for-bit the mirror of the unflipped one."""
    (plain,) = make_iterators(insightface_dir, 1, flip=False, random_shuffle=False)
    (flipped,) = make_iterators(insightface_dir, 1, flip=True, random_shuffle=False)
    mirrored = same = 0
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.labels, b.labels)
        for i in range(a.num_valid):
            if torch.equal(a.images[i], b.images[i]):
                same += 1
            else:
                assert torch.equal(a.images[i].flip(-1), b.images[i])
                mirrored += 1
    assert same + mirrored == 101
    assert 25 <= mirrored <= 76  # Binomial(101, 0.5): outside this range with probability < 1e-6


def test_decoded_size_different_from_property_is_an_error_unless_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    images = [(c, noise_jpeg(rng, size=24)) for c in range(3) for _ in range(3)]
    directory = write_insightface_dataset(tmp_path / "ds", images, 3, (SIZE, SIZE))
    it = DaliFaceIterator(directory, config(batch_size=3, initial_fill=1000), rank=0, world_size=1)
    with pytest.raises(DataFormatError, match=r"image key \d+ \(byte offset \d+\).*24x24 .*32x32.*fr_pack --image-size 32 32 --resize"):
        next(iter(it))
    resized = DaliFaceIterator(directory, config(batch_size=3, initial_fill=1000, resize=True), rank=0, world_size=1)
    assert next(iter(resized)).images.shape == (3, 3, SIZE, SIZE)


@pytest.mark.parametrize(("at", "garble", "problem"), [
    (-2, b"\x00\x00", "payload of {n} bytes has no end marker: the image is truncated or overwritten"),
    (0, b"GIF89a", "payload is not an image DALI decodes (it starts with bytes 47 49 46 38 39 61"),
])
def test_a_garbled_record_is_refused_at_open_naming_its_key(tmp_path: Path, at: int, garble: bytes,
                                                             problem: str) -> None:
    """Bytes overwritten inside the .rec: before any worker starts, not mid-epoch in DALI's decoder (which
    does not name the record)."""
    directory = write_insightface_dataset(tmp_path / "ds", samples()[:12], 2, (SIZE, SIZE))
    with open_dataset(directory) as ds:
        offset, (_, payload) = ds.reader.offset(6), ds.read_image(6)
    with open(directory / "train.rec", "r+b") as f:  # the payload follows the record and IRHeader heads
        f.seek(offset + 8 + 24 + (at % len(payload)))
        f.write(garble)
    expected = re.escape(problem.format(n=len(payload)))
    with pytest.raises(DataFormatError, match=rf"train\.rec: image key 6 \(byte offset {offset}\): {expected}.*"
                       r"fr_pack --verify"):
        prepare_dali_index(directory)


def test_undecodable_image_fails_with_a_pointer_to_the_verifier(tmp_path: Path) -> None:
    """Signature and end marker intact, the inside garbage: only a decode finds it."""
    images = samples()[:12]
    images[5] = (images[5][0], b"\xff\xd8\xff" + b"not a jpeg" * 8 + b"\xff\xd9")
    directory = write_insightface_dataset(tmp_path / "ds", images, 2, (SIZE, SIZE))
    it = DaliFaceIterator(directory, config(batch_size=4, random_shuffle=False), rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"train\.rec: the DALI pipeline of rank 0 failed .*fr_pack --verify"):
        list(it)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def test_restored_iterator_replays_the_exact_sample_sequence(insightface_dir: Path, tmp_path: Path) -> None:
    """Saved mid-epoch (after 1 epoch + 5 batches), the state survives torch.save/load(weights_only=True)
    and a fresh iterator continues with bit-identical batches (order, flips, labels), across the
    epoch boundary."""
    (it,) = make_iterators(insightface_dir, 2)[1:]  # rank 1 of 2
    list(it)
    stream = iter(it)
    for _ in range(5):
        next(stream)
    torch.save(it.state_dict(), tmp_path / "state.pt")
    expected = [next(stream) for _ in range(len(it) - 5)] + list(it)
    restored = make_iterators(insightface_dir, 2, **{})[1]
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.epoch == 1
    got = list(restored) + list(restored)
    assert len(got) == len(expected)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels) and a.num_valid == b.num_valid


def test_state_from_another_world_size_is_refused(insightface_dir: Path) -> None:
    (it,) = make_iterators(insightface_dir, 1)
    state = it.state_dict()
    (other,) = make_iterators(insightface_dir, 2)[:1]
    with pytest.raises(ValueError, match=r"world_size: saved 1 vs now 2"):
        other.load_state_dict(state)


def test_sorted_rec_with_a_shuffle_window_smaller_than_the_shard_warns(insightface_dir: Path) -> None:
    """DALI shuffles within initial_fill samples of file order: an identity-sorted .rec needs a big window."""
    with pytest.warns(UserWarning, match=r"sorted by label .*initial_fill=16 of the 101 samples per shard"):
        DaliFaceIterator(insightface_dir, config(initial_fill=16), rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DaliFaceIterator(insightface_dir, config(initial_fill=101), rank=0, world_size=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_pipeline_decodes_with_nvjpeg_to_cuda_tensors(insightface_dir: Path, dtype: str) -> None:
    """device='gpu' ("mixed" decode): CUDA tensors, every image once across 2 ranks, labels exact,
    pixels within JPEG-decoder differences of the PIL reference (nvJPEG's IDCT is not libjpeg's)."""
    iterators = make_iterators(insightface_dir, 2, device="gpu", device_id=0, flip=False, dtype=dtype)
    seen: list[int] = []
    with open_dataset(insightface_dir) as ds:
        for it in iterators:
            for batch in it:
                assert batch.images.is_cuda and batch.labels.is_cuda and batch.labels.dtype == torch.int64
                assert batch.images.dtype == getattr(torch, dtype)
                for i in range(batch.num_valid):
                    label, image = ds.read_image(int(batch.keys[i]))
                    assert int(batch.labels[i]) == label
                    diff = np.abs(batch.images[i].float().cpu().numpy() - reference_chw(image)) * 127.5
                    assert diff.mean() < 1.5 and diff.max() <= 16
                    seen.append(int(batch.keys[i]))
    assert sorted(seen) == sorted(int(k) for k in load_dali_index(insightface_dir).keys)


def test_config_rejects_half_precision_and_device_ids_on_cpu() -> None:
    with pytest.raises(ValueError, match="float16"):
        DaliConfig(batch_size=8, last_batch="pad", dtype="float16")
    with pytest.raises(ValueError, match="device_id"):
        DaliConfig(batch_size=8, last_batch="pad", device_id=0)
    with pytest.raises(ValueError, match="last_batch"):
        DaliConfig(batch_size=8, last_batch="partial")  # type: ignore[arg-type]
