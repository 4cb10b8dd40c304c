"""The synthetic IJB release (tests/ijb_release.py) must look like insightface's, or the IJB
evaluation tests built on it would prove nothing: exact file formats, landmarks that align each
loose crop back onto the face it came from, sparse ids, both media kinds, sound 1:1 and 1:N splits."""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.face_align import align_face, template_for
from data_pipeline.five_points import read_five_points
from data_pipeline.synthetic import SyntheticConfig
from tests.ijb_release import CSV_HEADER, IJBRelease, write_ijb_release

CFG = SyntheticConfig()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> IJBRelease:
    return write_ijb_release(tmp_path_factory.mktemp("ijbc"), CFG)


def _lines(path: Path) -> list[list[str]]:
    # insightface splits on single spaces (line.strip().split(' ')): no doubled or trailing blanks
    text = path.read_text()
    assert text.endswith("\n") and "  " not in text and " \n" not in text
    return [line.split(" ") for line in text.splitlines()]


def test_meta_files_have_insightface_formats(release: IJBRelease) -> None:
    assert sorted(p.name for p in release.meta.values()) == sorted(p.name for p in (release.root / "meta").iterdir())
    tid_mid = _lines(release.meta["tid_mid"])
    assert all(len(f) == 3 for f in tid_mid)
    assert [f[0] for f in tid_mid] == release.names
    for name, template, media in tid_mid:
        assert (int(template), int(media)) == (release.images[name].template, release.images[name].media)

    points = _lines(release.meta["landmarks"])
    assert all(len(f) == 12 for f in points)
    # same images in the same order: insightface pairs these two files' rows by position
    assert [f[0] for f in points] == release.names
    parsed = read_five_points(release.meta["landmarks"])
    assert parsed.names == release.names
    assert np.array_equal(parsed.points, np.stack([release.images[n].landmarks for n in release.names]))
    assert np.all((parsed.scores > 0.5) & (parsed.scores <= 1.0))

    pairs = np.array([[int(v) for v in f] for f in _lines(release.meta["pairs"])])
    assert pairs.shape[1] == 3 and set(pairs[:, 2]) == {0, 1}
    assert np.array_equal(pairs, np.stack([release.t1, release.t2, release.label], axis=1))
    assert set(pairs[:, :2].ravel()) <= {int(f[1]) for f in tid_mid}

    for role in ("gallery1", "gallery2", "probes"):
        rows = release.meta[role].read_text().splitlines()
        assert rows[0] == CSV_HEADER and rows[0].startswith("TEMPLATE_ID,SUBJECT_ID,FILENAME,")
        # how insightface's IJB_1N.py reads them
        table = np.loadtxt(release.meta[role], dtype=str, skiprows=1, delimiter=",")
        assert table.shape == (len(rows) - 1, 4)
        for template, subject, filename, _ in table:
            assert release.template_subject[int(template)] == int(subject)
            assert release.images[filename].template == int(template)

    files = sorted((release.root / "loose_crop").iterdir())
    assert sorted(p.name for p in files) == sorted(release.names)
    magic = {(p.suffix, p.read_bytes()[:4]) for p in files}
    assert magic == {(".jpg", b"\xff\xd8\xff\xe0"), (".png", b"\x89PNG")}


def test_landmarks_are_the_template_under_the_placing_transform(release: IJBRelease) -> None:
    template = template_for(112)
    for image in release.images.values():
        expected = template @ image.transform[:, :2].T + image.transform[:, 2]
        assert np.abs(image.landmarks - expected).max() <= 1e-6
        width, height = image.canvas_size
        assert np.all(image.landmarks > 0) and np.all(image.landmarks < [width, height])
        assert release.load_rgb(image.name).shape == (height, width, 3)


def test_alignment_recovers_the_original_face(release: IJBRelease) -> None:
    errors: dict[str, list[float]] = defaultdict(list)
    misaligned = []
    for name in release.names:
        image = release.images[name]
        loose = release.load_rgb(name)
        face = image.face.astype(np.float64)
        errors[Path(name).suffix].append(float(np.abs(align_face(loose, image.landmarks) - face).mean()))
        # the same crop aligned as if the face sat at the template: what an ignored transform costs
        misaligned.append(float(np.abs(align_face(loose, template_for(112)) - face).mean()))
    # measured (seed 0, 107 images): mean |error| 3.35 (JPEG q95) and 2.1 (PNG) grey levels per pixel,
    # worst image 5.8; the two bilinear resamplings alone cost ~2.1 and the 1-pixel rim, where the face
    # was blended into the scene, ~0.5 more. Ignoring the transform costs 30-70.
    for suffix, bound in ((".jpg", 4.5), (".png", 3.5)):
        assert np.mean(errors[suffix]) < bound, (suffix, np.mean(errors[suffix]))
    assert max(itertools.chain(*errors.values())) < 7.0
    assert min(misaligned) > 3 * max(itertools.chain(*errors.values()))


def test_ids_are_sparse_and_both_media_kinds_present(release: IJBRelease) -> None:
    templates = sorted(release.template_subject)
    media = sorted({im.media for im in release.images.values()})
    subjects = sorted(release.subject_identity)
    for ids, first in ((templates, 101), (media, 5001), (subjects, 1001)):
        assert ids[0] == first and ids != list(range(first, first + len(ids)))
        assert len(set(ids)) == len(ids)
    assert len(release.subject_identity) == 12
    per_subject = defaultdict(set)
    for template, subject in release.template_subject.items():
        per_subject[subject].add(template)
    assert all(len(ts) in (3, 4) for ts in per_subject.values())

    frames = defaultdict(list)
    for image in release.images.values():
        frames[image.media].append(image)
        assert release.template_subject[image.template] == image.subject
        assert release.subject_identity[image.subject] == image.identity
    kinds = {len(group) for group in frames.values()}
    assert 1 in kinds and kinds - {1} <= {2, 3} and kinds - {1}
    for group in frames.values():
        assert len({(im.template, im.identity) for im in group}) == 1  # one media, one template
        assert len({im.index for im in group}) == len(group)  # distinct frames
        assert all(im.video == (len(group) > 1) for im in group)
    assert 100 <= len(release.names) <= 200


def test_pairs_are_all_genuine_template_pairs_and_as_many_impostors(release: IJBRelease) -> None:
    pairs = list(zip(release.t1.tolist(), release.t2.tolist(), release.label.tolist(), strict=True))
    assert len({frozenset(p[:2]) for p in pairs}) == len(pairs) and all(a != b for a, b, _ in pairs)
    for a, b, label in pairs:
        assert label == int(release.template_subject[a] == release.template_subject[b])
    genuine = {frozenset((a, b)) for a, b in itertools.combinations(release.template_subject, 2)
               if release.template_subject[a] == release.template_subject[b]}
    assert {frozenset((a, b)) for a, b, label in pairs if label} == genuine
    assert release.label.sum() * 2 == len(pairs)
    assert not np.all(np.diff(release.label) <= 0)  # shuffled, not genuine-then-impostor


def test_galleries_are_disjoint_and_cover_every_probe_subject(release: IJBRelease) -> None:
    subject = release.template_subject
    g1 = [subject[t] for t in release.gallery1]
    g2 = [subject[t] for t in release.gallery2]
    assert len(set(g1)) == len(g1) == 6 and len(set(g2)) == len(g2) == 6  # one template per subject
    assert not set(g1) & set(g2)
    assert set(g1) | set(g2) == set(release.subject_identity)
    assert {subject[t] for t in release.probes} <= set(g1) | set(g2)
    enrolled = set(release.gallery1) | set(release.gallery2)
    assert not enrolled & set(release.probes)
    assert enrolled | set(release.probes) == set(subject)


def test_ijbb_names_determinism_and_landmark_noise(tmp_path: Path) -> None:
    a = write_ijb_release(tmp_path / "a", CFG, target="IJBB", subjects=3, seed=5)
    b = write_ijb_release(tmp_path / "b", CFG, target="IJBB", subjects=3, seed=5)
    assert sorted(p.name for p in (tmp_path / "a" / "meta").iterdir()) == sorted(
        ["ijbb_face_tid_mid.txt", "ijbb_template_pair_label.txt", "ijbb_name_5pts_score.txt",
         "ijbb_1N_gallery_S1.csv", "ijbb_1N_gallery_S2.csv", "ijbb_1N_probe_mixed.csv"])
    for role, path in a.meta.items():
        assert path.read_bytes() == b.meta[role].read_bytes(), role
    for name in a.names:
        assert (a.loose_crop / name).read_bytes() == (b.loose_crop / name).read_bytes()

    noisy = write_ijb_release(tmp_path / "n", CFG, target="IJBB", subjects=3, seed=5, landmark_noise=1.0)
    assert noisy.meta["tid_mid"].read_text() == a.meta["tid_mid"].read_text()
    shift = np.stack([noisy.images[n].landmarks - a.images[n].landmarks for n in a.names])
    assert 0.5 < shift.std() < 1.5
    assert np.array_equal(noisy.images[a.names[0]].face, a.images[a.names[0]].face)

    with pytest.raises(ValueError, match="target"):
        write_ijb_release(tmp_path / "x", CFG, target="IJBA")
    with pytest.raises(ValueError, match="subjects"):
        write_ijb_release(tmp_path / "x", CFG, subjects=1)
