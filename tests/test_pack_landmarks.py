"""``fr_pack --landmarks FILE``: raw photos aligned onto the ArcFace crop while packing.

The raw photos are synthetic faces (already aligned 112x112 crops) placed into larger canvases by a
known similarity ``A``; their landmarks are ``A`` applied to the ArcFace template, so aligning must
give the original face back. WHY integer matrices ``[[a, -b], [b, a]]`` with integer translation
for the main test: every output pixel then maps to a whole source pixel, both warps are exact
(checked: zero pixel difference before encoding), and the only loss left is the pack's own JPEG.
The bound is therefore "the error of JPEG alone", measured on the same face in the test.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import data_pipeline.pack as pack
from data_pipeline.dataset import open_dataset
from data_pipeline.face_align import template_for
from data_pipeline.pack import PackOptions, main, pack_folders, verify_dataset
from data_pipeline.synthetic import SyntheticConfig, render_image

_CFG = SyntheticConfig(num_identities=3, images_per_identity=2, holdout_identities=2, holdout_images_per_identity=2,
                       num_pairs=2)
_QUALITY = 95  # fr_pack's default --quality, the one every re-encoded image gets

# (a, b, tx, ty): the face → photo similarity [[a, -b, tx], [b, a, ty]]: rotation atan2(b, a), scale
# hypot(a, b). Integer entries keep both warps exact (see the module docstring); the translations
# keep the whole face inside the 460x460 canvas.
_EXACT_PLACEMENTS = [
    (0, 1, 150, 20),  # 90 degrees, scale 1
    (2, 1, 160, 10),  # 26.6 degrees, scale 2.24
    (1, -1, 60, 180),  # -45 degrees, scale 1.41
    (-2, 0, 300, 300),  # 180 degrees, scale 2
    (-1, -3, 120, 450),  # -108.4 degrees, scale 3.16
    (3, 1, 120, 10),  # 18.4 degrees, scale 3.16
]
_CANVAS = 460


def _similarity(a: float, b: float, tx: float, ty: float) -> np.ndarray:
    return np.array([[a, -b, tx], [b, a, ty]], dtype=np.float64)


def _photo(face: np.ndarray, matrix: np.ndarray, seed: int) -> np.ndarray:
    """``face`` warped by ``matrix`` onto a noise canvas (noise, so that a misplaced crop cannot
    pass for the face by landing on a flat background)."""
    canvas = np.random.default_rng(seed).integers(0, 256, size=(_CANVAS, _CANVAS, 3), dtype=np.uint8)
    return cv2.warpAffine(face, matrix, (_CANVAS, _CANVAS), dst=canvas, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_TRANSPARENT)


def _landmarks(matrix: np.ndarray) -> np.ndarray:
    """The ArcFace template carried into the photo by ``matrix`` (5x2, x y in the photo's pixels)."""
    return template_for(112) @ matrix[:, :2].T + matrix[:, 2]


def _line(name: str, points: np.ndarray, score: float | None = None) -> str:
    fields = [name, *(repr(float(v)) for v in points.reshape(-1))]
    return " ".join(fields + ([] if score is None else [repr(score)])) + "\n"


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=_QUALITY)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def _raw_photos(root: Path, placements: Sequence[tuple[float, float, float, float]],
                ) -> tuple[Path, Path, list[np.ndarray], list[str]]:
    """``root/src/id_XX/img_YY.png`` photos (3 identities x 2) and ``root/landmarks.txt``.

    Returns (src, landmark file, the original faces in pack order, the landmark lines). One photo is
    an RGBA PNG (opaque), so the RGB conversion before the warp is exercised; every other line
    carries a score and every other one does not (both forms of the file).
    """
    src = root / "src"
    faces, lines = [], []
    for n in range(6):
        identity, index = divmod(n, 2)
        face = render_image(_CFG, identity, index)
        matrix = _similarity(*placements[n % len(placements)])
        photo = _photo(face, matrix, seed=n)
        name = f"id_{identity:02d}/img_{index:02d}.png"
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if n == 3:
            photo = np.dstack([photo, np.full(photo.shape[:2], 255, dtype=np.uint8)])
        Image.fromarray(photo).save(src / name)
        faces.append(face)
        lines.append(_line(name, _landmarks(matrix), score=0.99 if n % 2 else None))
    landmarks = root / "landmarks.txt"
    landmarks.write_text("".join(lines), encoding="utf-8")
    return src, landmarks, faces, lines


def test_aligned_pack_gives_back_each_face_up_to_jpeg_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two worker processes (the points travel with the tasks). With exact warps the stored bytes are
    exactly the face encoded at --quality, so its error is JPEG's alone: measured on these six faces
    2.04 to 3.42 mean absolute error (0..255) at quality 95, against 6.0 or more for the same face
    misplaced by one pixel and 51 or more for another identity."""
    src, landmarks, faces, _ = _raw_photos(tmp_path, _EXACT_PLACEMENTS)
    out = tmp_path / "out"
    assert main([str(src), str(out), "--landmarks", str(landmarks), "--workers", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert ("packed 6 images of 3 identities" in captured.out
            and f"6 aligned to the 112x112 ArcFace crop by the landmarks in {landmarks}" in captured.out)
    with open_dataset(out) as dataset:
        assert dataset.labels().tolist() == [0, 0, 1, 1, 2, 2] and dataset.image_size == (112, 112)
        for key, face in zip(dataset.image_keys, faces, strict=True):
            _, stored = dataset.read_image(int(key))
            jpeg_alone = _mae(_decode(_jpeg(face)), face)
            assert jpeg_alone < 3.5
            assert _mae(_decode(stored), face) <= jpeg_alone + 1e-9
            assert stored == _jpeg(face)  # encoded as the pack encodes: RGB JPEG at --quality
    assert verify_dataset(out)["images"] == 6


def test_arbitrary_angles_and_subpixel_offsets_stay_within_jpeg_plus_interpolation(tmp_path: Path) -> None:
    """Real photos are neither integer-scaled nor pixel-aligned: here 17 and -35 degrees, scales 1.7
    and 2.3, fractional translations. Placing the face there and warping it back is two bilinear
    resamplings, which blur; measured on these six faces the pack's error exceeds JPEG alone by 0.34
    to 1.26 (1.44 at most over both placements of every face), while a one-pixel misplacement alone
    costs 6.0 or more; so the bound is JPEG alone + 2."""
    placements = []
    for degrees, scale, tx, ty in [(17.0, 1.7, 205.37, 41.61), (-35.0, 2.3, 95.29, 230.83)]:
        theta = np.deg2rad(degrees)
        placements.append((scale * np.cos(theta), scale * np.sin(theta), tx, ty))
    src, landmarks, faces, _ = _raw_photos(tmp_path, placements)
    out = tmp_path / "out"
    summary = pack_folders(src, out, PackOptions(workers=1, progress=False, landmarks=landmarks))
    with open_dataset(out) as dataset:
        for key, face in zip(dataset.image_keys, faces, strict=True):
            jpeg_alone = _mae(_decode(_jpeg(face)), face)
            assert _mae(_decode(dataset.read_image(int(key))[1]), face) <= jpeg_alone + 2.0
    assert (summary["aligned"], summary["images"], summary["warnings"]) == (6, 6, [])


def test_summary_records_the_alignment_and_the_file_is_read_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src, landmarks, _, _ = _raw_photos(tmp_path, _EXACT_PLACEMENTS)
    calls: list[Path] = []
    real = pack.read_five_points

    def counting(path: Path) -> object:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(pack, "read_five_points", counting)
    summary = pack_folders(src, tmp_path / "out", PackOptions(workers=1, progress=False, landmarks=landmarks))
    assert calls == [landmarks]
    assert (summary["images"], summary["aligned"], summary["landmarks"]) == (6, 6, str(landmarks))
    plain = pack_folders(_plain_crops(tmp_path / "crops"), tmp_path / "out_plain",
                         PackOptions(workers=1, progress=False))
    assert (plain["aligned"], plain["landmarks"], plain["warnings"]) == (0, None, [])


def _plain_crops(src: Path) -> Path:
    """Already aligned 112x112 crops: what fr_pack packs without --landmarks."""
    for identity in range(2):
        (src / f"id_{identity}").mkdir(parents=True)
        Image.fromarray(render_image(_CFG, identity, 0)).save(src / f"id_{identity}" / "a.jpg", quality=_QUALITY)
    return src


def test_smaller_crop_size(tmp_path: Path) -> None:
    """--image-size 64 64 aligns onto the template scaled to 64 pixels: the face shrunk by 64/112.
    The reference is the face shrunk by area averaging, a different filter from the warp's bilinear
    sampling, so the bound is measured rather than JPEG alone: 4.1 to 6.2 here, 7.3 or more for the
    face misplaced by 3 pixels (of 112) before shrinking."""
    src, landmarks, faces, _ = _raw_photos(tmp_path, _EXACT_PLACEMENTS)
    out = tmp_path / "out"
    assert main([str(src), str(out), "--landmarks", str(landmarks), "--image-size", "64", "64", "--workers", "1",
                 "--no-progress"]) == 0
    with open_dataset(out) as dataset:
        assert dataset.image_size == (64, 64)
        for key, face in zip(dataset.image_keys, faces, strict=True):
            stored = _decode(dataset.read_image(int(key))[1])
            shrunk = cv2.resize(face, (64, 64), interpolation=cv2.INTER_AREA)
            assert stored.shape == (64, 64, 3) and _mae(stored, shrunk) < 7.0
    assert verify_dataset(out)["image_size"] == [64, 64]


def test_landmark_lines_for_images_not_in_src_are_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Users often have one landmark file for a larger collection than the folders they pack."""
    src, landmarks, _, lines = _raw_photos(tmp_path, _EXACT_PLACEMENTS)
    extra = [_line(f"id_9{k}/x.jpg", np.arange(10.0)) for k in range(5)]
    landmarks.write_text("".join(extra[:2] + lines + extra[2:]), encoding="utf-8")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--landmarks", str(landmarks), "--workers", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "6 aligned" in captured.out
    [warning] = captured.err.splitlines()
    assert warning.startswith(f"fr_pack: warning: {landmarks}: 5 of 11 landmark lines name no image in {src}")
    assert "'id_90/x.jpg', 'id_91/x.jpg', 'id_92/x.jpg', ..." in warning and "ignored" in warning
    assert verify_dataset(out)["images"] == 6


def _drop_line(name: str) -> object:
    return lambda lines: [line for line in lines if not line.startswith(name + " ")]


def _replace_line(index: int, text: str) -> object:
    return lambda lines: [*lines[:index], text, *lines[index + 1:]]


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        pytest.param(_drop_line("id_01/img_01.png"),
                     ["{landmarks}: has no line for image 'id_01/img_01.png'", "Add a line 'IDENTITY/IMAGE x1 y1",
                      "or move the images without landmarks out of SRC_DIR"], id="image-without-line"),
        # Names relative to another root: every image is missing, and the error shows the names it has.
        pytest.param(lambda lines: ["photos/" + line for line in lines],
                     ["has no line for image 'id_00/img_00.png' (nor for 5 other images of {src})",
                      "6 of its names match no image there (e.g. 'photos/id_00/img_00.png'",
                      "relative to another folder than SRC_DIR"], id="names-with-another-root"),
        pytest.param(_replace_line(2, "id_01/img_00.png 1 2 3\n"),
                     ["{landmarks}: line 3: has 4 fields, want 11 or 12"], id="malformed-line"),
        pytest.param(_replace_line(4, _line("id_02/img_00.png", np.full((5, 2), 50.0), 0.9)),
                     ["{landmarks}: line 5: the landmarks of 'id_02/img_00.png' cannot align it",
                      "coincide", "Re-run the landmark detector"], id="degenerate-landmarks"),
    ],
)
def test_bad_landmarks_stop_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture, edit: object,
                                                       fragments: list[str]) -> None:
    src, landmarks, _, lines = _raw_photos(tmp_path, _EXACT_PLACEMENTS)
    landmarks.write_text("".join(edit(lines)), encoding="utf-8")  # type: ignore[operator]
    out = tmp_path / "out"
    assert main([str(src), str(out), "--landmarks", str(landmarks), "--workers", "2", "--no-progress"]) == 1
    captured = capsys.readouterr()
    [message] = captured.err.splitlines()
    assert message.startswith("fr_pack: error: ") and captured.out == ""
    for fragment in fragments:
        assert fragment.format(landmarks=landmarks, src=src) in message
    assert not out.exists()  # checked in the parent, before OUT is created


def test_missing_landmark_file_and_unreadable_photo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, landmarks, _, _ = _raw_photos(tmp_path, _EXACT_PLACEMENTS)
    out = tmp_path / "out"
    assert main([str(src), str(out), "--landmarks", str(tmp_path / "nope.txt"), "--no-progress"]) == 1
    assert f"{tmp_path / 'nope.txt'}: landmark file not found" in capsys.readouterr().err
    assert not out.exists()
    (src / "id_01" / "img_00.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main([str(src), str(out), "--landmarks", str(landmarks), "--workers", "1", "--no-progress"]) == 1
    assert "img_00.png: not a readable image" in capsys.readouterr().err
    assert not (out / "train.rec").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resize"], "--resize does not apply with --landmarks"),
        (["--image-size", "112", "96"], "--image-size must be square, got 112 96"),
    ],
)
def test_options_that_contradict_alignment_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "src"), str(tmp_path / "out"), "--landmarks", str(tmp_path / "lm.txt"), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--verify", str(tmp_path), "--landmarks", str(tmp_path / "lm.txt")])
    assert "--landmarks only applies to packing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="square"):
        PackOptions(image_size=(112, 96), landmarks=tmp_path / "lm.txt")
