"""Alignment (data_pipeline/face_align.py) recovers the transform a face was placed by, and the
five-point file (data_pipeline/five_points.py) refuses every malformed line by its number."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_pipeline.errors import DataFormatError
from data_pipeline.face_align import ARCFACE_TEMPLATE_112, align_face, similarity_transform, template_for
from data_pipeline.five_points import read_five_points
from data_pipeline.synthetic import SyntheticConfig, render_image


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.radians(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:, :2].T + m[:, 2]


def _inverse(m: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]


@pytest.mark.parametrize("angle, scale, tx, ty", [(0, 1, 0, 0), (23, 1.6, 40, 12), (-170, 0.7, 150, 90),
                                                  (90, 2.5, 300, -20)])
def test_exact_landmarks_give_back_the_inverse_of_the_placing_transform(angle, scale, tx, ty) -> None:
    placed = _similarity(angle, scale, tx, ty)
    found = similarity_transform(_apply(placed, ARCFACE_TEMPLATE_112), ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(found, _inverse(placed), atol=1e-9)


def test_noisy_landmarks_give_the_least_squares_similarity() -> None:
    """The closed form equals a direct minimisation: no other similarity has a smaller squared error."""
    rng = np.random.default_rng(0)
    src = _apply(_similarity(15, 1.4, 30, 40), ARCFACE_TEMPLATE_112) + rng.normal(0, 1.5, (5, 2))
    m = similarity_transform(src, ARCFACE_TEMPLATE_112)
    # parametrise a similarity as (a, b, tx, ty): [[a, -b, tx], [b, a, ty]]; linear least squares in float64
    rows = [[x, -y, 1, 0] for x, y in src] + [[y, x, 0, 1] for x, y in src]
    rhs = np.concatenate([ARCFACE_TEMPLATE_112[:, 0], ARCFACE_TEMPLATE_112[:, 1]])
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), rhs, rcond=None)[0]
    np.testing.assert_allclose(m, [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_a_mirrored_point_set_is_aligned_by_a_rotation_not_a_reflection() -> None:
    mirrored = ARCFACE_TEMPLATE_112 * [-1, 1]
    m = similarity_transform(mirrored, ARCFACE_TEMPLATE_112)
    assert np.linalg.det(m[:, :2]) > 0


def test_coinciding_or_non_finite_landmarks_are_refused() -> None:
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.full((5, 2), 7.0), ARCFACE_TEMPLATE_112)
    bad = ARCFACE_TEMPLATE_112.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(bad, ARCFACE_TEMPLATE_112)


def test_align_face_recovers_a_face_placed_in_a_larger_photo() -> None:
    """Bound: the face went through two bilinear resamplings (placed, then aligned). The error of the
    same round trip through the *true* inverse is the floor any estimate can reach; exact landmarks
    must reach it to within rounding (±1 level), and both stay a few levels on a 0-255 scale (~2 here),
    far below a one-pixel shift of the same face (the error a wrong transform would show)."""
    face = render_image(SyntheticConfig(image_size=112), 3, 0)
    placed = _similarity(28, 1.5, 60, 20)
    photo = cv2.warpAffine(face, placed, (300, 260), flags=cv2.INTER_LINEAR)
    aligned = align_face(photo, _apply(placed, template_for(112)))
    floor = cv2.warpAffine(photo, _inverse(placed), (112, 112), flags=cv2.INTER_LINEAR)
    inner = (slice(4, -4), slice(4, -4))  # the rim mixes with the photo's black border in both
    err = np.abs(aligned.astype(float) - face)[inner].mean()
    assert np.abs(aligned.astype(int) - floor.astype(int)).max() <= 1
    shifted = np.abs(np.roll(face, 1, axis=1).astype(float) - face)[inner].mean()
    assert err < 4.0 and err < shifted / 2, (err, shifted)


def test_align_face_at_another_size_uses_the_scaled_template() -> None:
    face = render_image(SyntheticConfig(image_size=64), 1, 0)
    aligned = align_face(face, template_for(64), size=64)
    assert aligned.shape == (64, 64, 3) and np.abs(aligned.astype(int) - face).max() <= 1


def _write(tmp_path, text: str):
    path = tmp_path / "points.txt"
    path.write_text(text)
    return path


GOOD = "a.jpg " + " ".join(f"{v:.3f}" for v in ARCFACE_TEMPLATE_112.ravel())


def test_the_five_point_file_reads_names_points_and_scores(tmp_path) -> None:
    fp = read_five_points(_write(tmp_path, f"{GOOD} 0.93\n\nb/c.png {' '.join(['1'] * 10)}\n"))
    assert fp.names == ["a.jpg", "b/c.png"] and fp.row_of == {"a.jpg": 0, "b/c.png": 1} and fp.lines == [1, 3]
    np.testing.assert_allclose(fp.points[0], ARCFACE_TEMPLATE_112, atol=1e-3)
    assert fp.scores.tolist() == [0.93, 1.0]  # no score column: 1.0, which weights nothing


@pytest.mark.parametrize("line, says", [
    ("a.jpg 1 2 3", "line 2: has 4 fields, want 11 or 12"),
    ("a.jpg 1 2 3 4 5 6 7 8 9 x 1", "line 2: has a field that is not a number"),
    ("a.jpg 1 2 3 4 5 6 7 8 9 inf 1", "line 2: has a non-finite value"),
    ("z.jpg 1 2 3 4 5 6 7 nan 9 10 1", "line 2: has a non-finite value"),
])
def test_a_malformed_five_point_line_is_named(tmp_path, line, says) -> None:
    with pytest.raises(DataFormatError, match=says):
        read_five_points(_write(tmp_path, f"{GOOD.replace('a.jpg', 'first.jpg')} 1\n{line}\n"))


def test_an_image_listed_twice_names_both_lines(tmp_path) -> None:
    with pytest.raises(DataFormatError, match=r"lines 1 and 2: both name 'a\.jpg'"):
        read_five_points(_write(tmp_path, f"{GOOD} 1\n{GOOD} 1\n"))
