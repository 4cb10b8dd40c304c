"""``fr_pack``: image folders → insightface RecordIO, ``--verify``, ``--write-property``, the DALI hook."""

from __future__ import annotations

import io
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.dataset import open_dataset
from data_pipeline.errors import DataFormatError
from data_pipeline.pack import main, verify_dataset, write_insightface_dataset
from data_pipeline.recordio import IRHeader, RecordWriter, pack_record
from tests.rec_fixtures import identity_folders, insightface_dataset, jpeg_bytes, png_bytes


def test_fr_pack_labels_identity_folders_in_sorted_name_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two worker processes; RGB JPEGs are stored as is, RGBA PNG and grayscale JPEG re-encoded; dot-files ignored."""
    src = identity_folders(tmp_path / "src", [2, 1, 3])
    (src / "id_01" / "b_alpha.png").write_bytes(png_bytes(7))
    (src / "id_02" / "a_gray.jpg").write_bytes(jpeg_bytes(8, mode="L"))
    (src / "id_00" / ".DS_Store").write_bytes(b"\x00junk")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--image-size", "16", "16", "--workers", "2", "--no-progress"]) == 0
    assert "packed 8 images of 3 identities" in capsys.readouterr().out
    with open_dataset(out) as dataset:
        assert dataset.layout == "insightface" and dataset.num_classes == 3 and len(dataset) == 8
        assert dataset.labels().tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
        assert dataset.read_image(1) == (0, (src / "id_00" / "img_00.jpg").read_bytes())
        for key, label in ((3, 1), (5, 2)):  # id_01/b_alpha.png and id_02/a_gray.jpg sort first in their folders
            got_label, converted = dataset.read_image(key)
            with Image.open(io.BytesIO(converted)) as image:
                assert (got_label, image.format, image.mode, image.size) == (label, "JPEG", "RGB", (16, 16))
    assert (out / "identities.txt").read_text() == "0\tid_00\n1\tid_01\n2\tid_02\n"
    assert verify_dataset(out)["images"] == 8


def test_fr_pack_refuses_images_of_another_size_unless_resize(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = identity_folders(tmp_path / "src", [1, 1], size=24)
    assert main([str(src), str(tmp_path / "a"), "--image-size", "16", "16", "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "id_00/img_00.jpg" in err and "24x24 (WxH), expected 16x16" in err and "--resize" in err
    assert main([str(src), str(tmp_path / "b"), "--image-size", "16", "16", "--resize", "--workers", "1",
                 "--no-progress"]) == 0
    assert verify_dataset(tmp_path / "b")["image_size"] == [16, 16]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda src: (src / "id_01" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really"), "broken.jpg: not a readable image"),
        (lambda src: (src / "stray.jpg").write_bytes(jpeg_bytes(0)), "stray.jpg: file at the top level"),
        (lambda src: (src / "id_99").mkdir(), "id_99: identity folder has no images"),
        (lambda src: (src / "id_00" / "sub").mkdir(), "sub: nested folder"),
        # A name in bytes that are not UTF-8 (issue 26: a traceback after train.rec was written)
        (lambda src: (src / "id_01").rename(src / os.fsdecode(b"id_\xff")), "identity folder name is not valid UTF-8"),
    ],
)
def test_fr_pack_stops_at_the_first_bad_source_entry_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, make: object, message: str
) -> None:
    src = identity_folders(tmp_path / "src", [1, 1])
    make(src)  # type: ignore[operator]
    assert main([str(src), str(tmp_path / "out"), "--image-size", "16", "16", "--workers", "1", "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.rec").exists()


def test_verify_json_summary_is_the_last_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    insightface_dataset(tmp_path, [2, 3])
    assert main(["--verify", str(tmp_path), "--json", "--workers", "1"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ok"] is True
    assert (last["images"], last["identities"], last["layout"], last["records"]) == (5, 2, "insightface", 8)


def test_verify_in_worker_processes_matches_inline(tmp_path: Path) -> None:
    """Chunks decoded by two processes give the same summary as one process."""
    insightface_dataset(tmp_path, [3, 2, 2])
    assert verify_dataset(tmp_path, workers=2, chunk=2) == verify_dataset(tmp_path, workers=1)


def test_verify_accepts_im2rec_datasets_and_counts_classes_without_images(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key, label in enumerate([0, 2, 2]):
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), jpeg_bytes(key)))
    assert main(["--write-property", str(tmp_path)]) == 0
    assert (tmp_path / "property").read_text() == "3,16,16\n"
    summary = verify_dataset(tmp_path)
    assert (summary["layout"], summary["images"], summary["identities"]) == ("im2rec", 3, 3)
    assert summary["classes_without_images"] == 1


def test_verify_warns_when_the_property_claims_classes_without_images(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """1000 classes claimed, 8 used: still OK (the data is consistent), but said on stderr and in --json."""
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in range(8):
            writer.write(key, pack_record(IRHeader(0, float(key), key, 0), jpeg_bytes(key)))
    (tmp_path / "property").write_text("1000,16,16\n")
    assert main(["--verify", str(tmp_path), "--json", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"OK {tmp_path}")
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["classes_without_images"] == 992
    (warning,) = summary["warnings"]
    assert "property: 992 of 1000 classes have no images (classes 8, 9, 10, 11, 12, ...)" in warning
    assert f"fr_pack --write-property {tmp_path}" in warning
    assert f"fr_pack: warning: {warning}" in captured.err


def test_verify_has_no_warning_when_every_class_has_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    insightface_dataset(tmp_path, [1, 2])
    assert main(["--verify", str(tmp_path), "--json", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["warnings"] == [] and "warning" not in captured.err


def test_fr_pack_refuses_a_non_empty_output_directory_unless_overwrite(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """A second pack into the same OUT leaves the first dataset byte for byte; --overwrite replaces
    only the dataset files, never the user's other files in OUT."""
    args = ["--image-size", "16", "16", "--workers", "1", "--no-progress"]
    out = tmp_path / "out"
    out.mkdir()  # an existing but empty directory is fine
    assert main([str(identity_folders(tmp_path / "first", [1, 1])), str(out), *args]) == 0
    (out / "lfw.bin").write_bytes(b"the user's verification set")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    second = identity_folders(tmp_path / "second", [2, 2, 2])
    assert main([str(second), str(out), *args]) == 1
    err = capsys.readouterr().err
    assert f"{out}: output directory is not empty" in err and "--overwrite" in err and "identities.txt" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    assert main([str(second), str(out), *args, "--overwrite"]) == 0
    assert verify_dataset(out)["images"] == 6
    assert (out / "lfw.bin").read_bytes() == b"the user's verification set"


def test_writing_a_dataset_over_another_needs_overwrite(tmp_path: Path) -> None:
    insightface_dataset(tmp_path, [1, 1])
    rec = (tmp_path / "train.rec").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a dataset \(train\.rec, train\.idx, property\); "
                                              r"pass overwrite=True"):
        write_insightface_dataset(tmp_path, [(0, jpeg_bytes(5))], 1, (16, 16))
    assert (tmp_path / "train.rec").read_bytes() == rec
    write_insightface_dataset(tmp_path, [(0, jpeg_bytes(5))], 1, (16, 16), overwrite=True)
    assert verify_dataset(tmp_path)["images"] == 1


def test_cli_refuses_ambiguous_modes(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--verify", "a", "--write-property", "b"])
    assert exit_info.value.code == 2
    assert "exactly one of" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The DALI index hook
# ------------------------------------------------------------------------------------------------
def test_packing_calls_prepare_dali_index_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    dali = types.ModuleType("data_pipeline.dali")
    dali.prepare_dali_index = lambda out_dir: calls.append(Path(out_dir))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "data_pipeline.dali", dali)
    write_insightface_dataset(tmp_path, [(0, jpeg_bytes(0))], 1, (16, 16))
    assert calls == [tmp_path]


def test_packing_without_prepare_dali_index_still_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "data_pipeline.dali", types.ModuleType("data_pipeline.dali"))
    write_insightface_dataset(tmp_path, [(0, jpeg_bytes(0))], 1, (16, 16))
    assert (tmp_path / "train.rec").is_file()


def test_errors_raised_by_prepare_dali_index_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(out_dir: Path) -> None:
        raise ImportError("nvidia.dali is broken")

    dali = types.ModuleType("data_pipeline.dali")
    dali.prepare_dali_index = failing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "data_pipeline.dali", dali)
    with pytest.raises(ImportError, match="is broken"):
        write_insightface_dataset(tmp_path, [(0, jpeg_bytes(0))], 1, (16, 16))


def _gray16_png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_white(tmp_path: Path) -> None:
    """PIL's convert("RGB") clips 16-bit values at 255 (a mid-gray 16-bit PNG became near-white,
    mean 254.4); fr_pack scales by 1/257."""
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16)
    src = identity_folders(tmp_path / "src", [1, 1])
    (src / "id_01" / "deep.png").write_bytes(_gray16_png(ramp))
    out = tmp_path / "out"
    assert main([str(src), str(out), "--image-size", "16", "16", "--no-progress"]) == 0
    with open_dataset(out) as dataset:
        _, stored = dataset.read_image(2)  # key 1: id_00/img_00.jpg; id_01/deep.png sorts before img_00.jpg
    with Image.open(io.BytesIO(stored)) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert abs(pixels.mean() - ramp.mean() / 257) < 2.0 and pixels.max() > 240 and pixels.min() < 15
    assert verify_dataset(out)["images"] == 3


def test_verify_refuses_a_16_bit_image_another_tool_packed(tmp_path: Path) -> None:
    samples = [(0, jpeg_bytes(1)), (1, _gray16_png(np.full((16, 16), 32768)))]
    write_insightface_dataset(tmp_path / "ds", samples, 2, (16, 16))
    with pytest.raises(DataFormatError, match=r"train\.rec: key 2 \(byte offset \d+\): image is I;16 \(more than 8 bits per sample\).*fr_pack"):
        verify_dataset(tmp_path / "ds")


def _cmyk_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(out, format="JPEG", quality=95)  # red
    return out.getvalue()


def _webp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(out, format="WEBP", lossless=True)
    return out.getvalue()


@pytest.mark.parametrize(("name", "payload", "colour"), [
    ("cmyk.jpg", _cmyk_jpeg, (255, 0, 0)),
    ("blue.webp", _webp, (0, 0, 255)),
])
def test_cmyk_jpeg_and_webp_are_packed_as_rgb_jpeg_in_their_colours(tmp_path: Path, name: str, payload: object,
                                                                     colour: tuple[int, int, int]) -> None:
    """Issue 26's careless inputs: what a crawl of the web holds beside RGB JPEGs."""
    src = identity_folders(tmp_path / "src", [1, 1])
    (src / "id_01" / name).write_bytes(payload())  # type: ignore[operator]
    assert main([str(src), str(tmp_path / "out"), "--image-size", "16", "16", "--workers", "1", "--no-progress"]) == 0
    with open_dataset(tmp_path / "out") as dataset:
        label, data = dataset.read_image(2)  # key 1 is id_00's image; id_01's first (sorted) is this one
        with Image.open(io.BytesIO(data)) as image:
            assert (label, image.format, image.mode) == (1, "JPEG", "RGB")
            assert np.abs(np.asarray(image, dtype=float).mean(axis=(0, 1)) - colour).max() < 8


def test_names_with_spaces_and_non_ascii_characters_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for folder, file in (("José Ñ", "ü 1.jpg"), ("李 小龙", "照片 2.jpg")):
        (src / folder).mkdir(parents=True)
        (src / folder / file).write_bytes(jpeg_bytes(len(folder)))
    assert main([str(src), str(tmp_path / "out"), "--image-size", "16", "16", "--workers", "1", "--no-progress"]) == 0
    assert (tmp_path / "out" / "identities.txt").read_text(encoding="utf-8") == "0\tJosé Ñ\n1\t李 小龙\n"


def _bomb(src: Path) -> None:
    """A 109 KB PNG declaring 30000 × 30000 pixels."""
    Image.new("1", (30000, 30000)).save(src / "id_01" / "bomb.png", optimize=True)


@pytest.mark.parametrize(("make", "message"), [
    (lambda src: (src / "id_01" / "empty.jpg").write_bytes(b""), "empty.jpg: not a readable image"),
    (lambda src: (src / "id_01" / "notes.jpg").write_text("not an image"), "notes.jpg: not a readable image"),
    (_bomb, "bomb.png: not a readable image (Image size (900000000 pixels) exceeds limit"),
    (lambda src: (src / "id_01" / "loop").symlink_to(src / "id_01"), "loop: nested folder"),
])
def test_unreadable_oversized_and_looping_entries_are_refused_naming_them(
        tmp_path: Path, capsys: pytest.CaptureFixture, make: object, message: str) -> None:
    src = identity_folders(tmp_path / "src", [1, 1])
    make(src)  # type: ignore[operator]
    assert main([str(src), str(tmp_path / "out"), "--image-size", "16", "16", "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "train.rec").exists()
