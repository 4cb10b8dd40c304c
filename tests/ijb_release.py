"""A small synthetic IJB-B / IJB-C release, written in insightface's exact file formats.

WHY: the real IJB-B/C are licence-gated and tens of GB, so the IJB evaluation path (reading the
meta files, aligning loose crops with the five-point landmarks, pooling media into templates,
1:1 pairs and 1:N galleries) would otherwise go untested. This writer produces the same layout
that insightface's ``IJB_11.py`` / ``IJB_1N.py`` read, from held-out synthetic identities, and it
records the ground truth (the face every loose crop was made from and the transform that placed
it) so that tests can check alignment to the pixel and scores against known identities.

Layout under ``root`` (``p`` is ``ijbc`` or ``ijbb``)::

    loose_crop/1.jpg, 2.jpg, ..., 5.png, ...   the face placed into a larger noisy scene
    meta/{p}_face_tid_mid.txt                  "image template_id media_id"
    meta/{p}_template_pair_label.txt           "t1 t2 label"        (1 genuine, 0 impostor)
    meta/{p}_name_5pts_score.txt               "image x1 y1 ... x5 y5 score"
    meta/ijbc_1N_gallery_G1.csv, _G2.csv, ijbc_1N_probe_mixed.csv     (IJB-B: _S1, _S2)
                                               header "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"

Choices that exist to catch bugs in readers:

* template, media and subject ids are sparse integers (101, 103, 104, ... / 5001, 5004, ...), so
  code that uses an id as an array index fails here rather than on the real release;
* the pair file is shuffled (labels are not sorted), and impostor pairs span both galleries;
* templates mix single stills (a media id of their own) with multi-frame media (2-3 frames of one
  identity sharing a media id), so media pooling is exercised;
* every fifth loose crop is a PNG, the rest JPEG (quality 95), as insightface's loose crops mix;
* the tid_mid and the five-point file list the same images in the same order, because
  insightface's scripts pair their rows by position, not by name.

The landmarks are the ArcFace 112 template pushed through the placing transform ``T``, so
``align_face(loose_crop, landmarks)`` computes exactly ``T``'s inverse and recovers the face up
to two bilinear resamplings and JPEG loss. Everything is a pure function of the arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data_pipeline.face_align import template_for
from data_pipeline.synthetic import SyntheticConfig, holdout_identity, render_image

ALIGNED_SIZE = 112
#: Rendered image indices start here, so IJB faces are not the images of the held-out ``.bin``
#: (which uses indices ``0..holdout_images_per_identity-1`` of the same identities).
_INDEX_BASE = 1000
_FIRST_TEMPLATE_ID, _FIRST_MEDIA_ID, _FIRST_SUBJECT_ID = 101, 5001, 1001
_STRUCTURE_STREAM, _PLACEMENT_STREAM = 11, 12
_JPEG_QUALITY = 95
_PNG_EVERY = 5

#: target → (file prefix, names of gallery 1 and gallery 2 in the 1:N csv files)
_TARGETS = {"IJBC": ("ijbc", "G1", "G2"), "IJBB": ("ijbb", "S1", "S2")}
CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"


@dataclass(frozen=True)
class IJBImage:
    """Ground truth of one loose crop: what was drawn, where, and what the meta files say about it."""

    name: str  # file name under loose_crop/ (as in the meta files)
    face: np.ndarray  # 112x112x3 uint8 RGB: the aligned face the loose crop was made from
    transform: np.ndarray  # 2x3 float64 T: face pixel (x, y) -> loose-crop pixel, as given to cv2.warpAffine
    landmarks: np.ndarray  # 5x2 float64, exactly the values written to the five-point file
    score: float  # detector score written to the five-point file
    canvas_size: tuple[int, int]  # (width, height) of the loose crop
    subject: int  # SUBJECT_ID
    identity: int  # synthetic identity (render_image's ``identity``)
    index: int  # render_image's ``index``
    template: int
    media: int
    video: bool  # True for a frame of multi-frame media, False for a single still


@dataclass
class IJBRelease:
    """What :func:`write_ijb_release` wrote and the truth behind it.

    ``names`` is the file order of tid_mid and the five-point file. Pairs are parallel int64 arrays
    in file order. ``gallery1``/``gallery2``/``probes`` are template ids in csv order."""

    root: Path
    target: str  # "IJBC" or "IJBB"
    prefix: str  # "ijbc" or "ijbb"
    meta: dict[str, Path]  # role ("tid_mid", "pairs", "landmarks", "gallery1", "gallery2", "probes") -> file
    names: list[str]
    images: dict[str, IJBImage]
    template_subject: dict[int, int]  # template id -> SUBJECT_ID
    template_images: dict[int, list[str]]  # template id -> its image names
    subject_identity: dict[int, int]  # SUBJECT_ID -> synthetic identity
    t1: np.ndarray
    t2: np.ndarray
    label: np.ndarray
    gallery1: list[int] = field(default_factory=list)
    gallery2: list[int] = field(default_factory=list)
    probes: list[int] = field(default_factory=list)

    @property
    def loose_crop(self) -> Path:
        return self.root / "loose_crop"

    def load_rgb(self, name: str) -> np.ndarray:
        """The loose crop ``name`` as written (decoded, RGB uint8): cv2 reads BGR, the faces are RGB."""
        image = cv2.imread(str(self.loose_crop / name), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(self.loose_crop / name)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _sparse_ids(rng: np.random.Generator, start: int, count: int) -> list[int]:
    """``count`` increasing ids from ``start`` with gaps of 1-3: unique, but not ``0..n-1``."""
    gaps = rng.integers(1, 4, size=count)
    gaps[0] = 0
    return [int(v) for v in start + np.cumsum(gaps)]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A non-black scene: a linear colour gradient in a random direction plus sensor-like noise.
    Non-black so that a crop that samples outside the face shows up as an error, not as zeros."""
    c0, c1 = rng.uniform(40, 215, size=3), rng.uniform(40, 215, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
    image = c0 + (c1 - c0) * ramp[..., None] + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(image, 16, 250).astype(np.uint8)


def _placement(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A similarity T (rotation within ±25°, scale 1.1-1.8) and a canvas that holds the whole
    rotated 112 crop with a random margin on every side, so every aligned pixel has a source."""
    angle = math.radians(rng.uniform(-25, 25))
    scale = rng.uniform(1.1, 1.8)
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    # pixel centres are integers in OpenCV, so the crop covers [-0.5, 111.5]^2
    corners = np.array([[-0.5, -0.5], [ALIGNED_SIZE - 0.5, -0.5], [-0.5, ALIGNED_SIZE - 0.5],
                        [ALIGNED_SIZE - 0.5, ALIGNED_SIZE - 0.5]]) @ rot.T
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    margin_lo = rng.uniform(6, 40, size=2)
    margin_hi = rng.uniform(6, 40, size=2)
    offset = margin_lo - lo
    width, height = (math.ceil(v) for v in hi - lo + margin_lo + margin_hi)
    return np.hstack([rot, offset[:, None]]), (width, height)


def _compose(face: np.ndarray, transform: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``face`` warped by ``transform`` over ``background`` (bilinear, alpha-blended at the edge)."""
    height, width = background.shape[:2]
    warped = cv2.warpAffine(face, transform, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32)
    alpha = cv2.warpAffine(np.ones(face.shape[:2], np.float32), transform, (width, height),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
    # the face warp is already premultiplied by alpha (its border samples black), so add, don't lerp
    out = warped + (1.0 - alpha) * background.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _aligned_face(cfg: SyntheticConfig, identity: int, index: int) -> np.ndarray:
    face = render_image(cfg, identity, index)
    if face.shape[0] != ALIGNED_SIZE:
        face = cv2.resize(face, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(face)


def _template_plan(rng: np.random.Generator) -> list[list[int]]:
    """The media of one subject's templates as frame counts (1 = still, 2-3 = video frames).
    The first template is one still and the second one video, so every subject has both kinds."""
    plan = [[1], [int(rng.integers(2, 4))]]
    for _ in range(int(rng.integers(1, 3))):  # 3 or 4 templates in all
        plan.append([1 if rng.uniform() < 0.5 else int(rng.integers(2, 4)) for _ in range(int(rng.integers(1, 4)))])
    return plan


def write_ijb_release(root: Path, cfg: SyntheticConfig, target: str = "IJBC", subjects: int = 12, seed: int = 0,
                      landmark_noise: float = 0.0) -> IJBRelease:
    """Write a synthetic ``target`` release under ``root`` (created) and return its ground truth.

    ``subjects`` held-out identities ``holdout_identity(cfg, 0..subjects-1)``, 3-4 templates each.
    ``landmark_noise`` (pixels, Gaussian std) perturbs the written landmarks, for tests of robustness;
    by default they are exact. Deterministic in all arguments (12 subjects: ~100 images, ~1 s)."""
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {sorted(_TARGETS)}, got {target!r}")
    if subjects < 2:
        raise ValueError(f"subjects must be >= 2 (impostor pairs and two galleries), got {subjects}")
    prefix, g1_name, g2_name = _TARGETS[target]
    root = Path(root)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _STRUCTURE_STREAM])

    plans = [_template_plan(rng) for _ in range(subjects)]
    n_templates = sum(len(p) for p in plans)
    n_media = sum(len(t) for p in plans for t in p)
    template_ids = iter(_sparse_ids(rng, _FIRST_TEMPLATE_ID, n_templates))
    media_ids = iter(_sparse_ids(rng, _FIRST_MEDIA_ID, n_media))
    subject_ids = _sparse_ids(rng, _FIRST_SUBJECT_ID, subjects)

    template_points = template_for(ALIGNED_SIZE)
    names: list[str] = []
    images: dict[str, IJBImage] = {}
    template_subject: dict[int, int] = {}
    template_images: dict[int, list[str]] = {}
    subject_templates: dict[int, list[int]] = {}
    subject_identity: dict[int, int] = {}
    for k, (plan, subject) in enumerate(zip(plans, subject_ids, strict=True)):
        identity = holdout_identity(cfg, k)
        subject_identity[subject] = identity
        subject_templates[subject] = []
        index = _INDEX_BASE
        for frames_per_media in plan:
            template = next(template_ids)
            template_subject[template] = subject
            template_images[template] = []
            subject_templates[subject].append(template)
            for frames in frames_per_media:
                media = next(media_ids)
                for _ in range(frames):
                    number = len(names) + 1
                    name = f"{number}.png" if number % _PNG_EVERY == 0 else f"{number}.jpg"
                    place = np.random.default_rng([seed, _PLACEMENT_STREAM, number])
                    transform, (width, height) = _placement(place)
                    face = _aligned_face(cfg, identity, index)
                    loose = _compose(face, transform, _background(place, width, height))
                    points = template_points @ transform[:, :2].T + transform[:, 2]
                    if landmark_noise > 0:
                        points = points + place.normal(0, landmark_noise, size=points.shape)
                    points = np.round(points, 6)  # what the text file holds, so truth == file
                    score = round(float(place.uniform(0.6, 1.0)), 6)
                    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if name.endswith(".jpg") else []
                    if not cv2.imwrite(str(root / "loose_crop" / name), cv2.cvtColor(loose, cv2.COLOR_RGB2BGR),
                                       params):
                        raise OSError(f"cv2.imwrite failed for {root / 'loose_crop' / name}")
                    images[name] = IJBImage(name=name, face=face, transform=transform, landmarks=points,
                                            score=score, canvas_size=(width, height), subject=subject,
                                            identity=identity, index=index, template=template, media=media,
                                            video=frames > 1)
                    names.append(name)
                    template_images[template].append(name)
                    index += 1

    # 1:1 pairs: every genuine template pair once, as many impostor pairs, shuffled together
    genuine = [(a, b) for ts in subject_templates.values() for i, a in enumerate(ts) for b in ts[i + 1:]]
    all_templates = list(template_subject)
    impostor: set[tuple[int, int]] = set()
    while len(impostor) < len(genuine):
        a, b = (all_templates[int(i)] for i in rng.choice(len(all_templates), size=2, replace=False))
        if template_subject[a] != template_subject[b] and (b, a) not in impostor:
            impostor.add((a, b))
    pairs = [(a, b, 1) for a, b in genuine] + [(a, b, 0) for a, b in sorted(impostor)]
    pairs = [pairs[int(i)] for i in rng.permutation(len(pairs))]
    t1, t2, label = (np.array(col, dtype=np.int64) for col in zip(*pairs, strict=True))

    # 1:N: half the subjects enrol in gallery 1, the rest in gallery 2, one template each; the
    # subjects' other templates are the (mixed) probes
    order = [subject_ids[int(i)] for i in rng.permutation(subjects)]
    halves = (order[: subjects // 2], order[subjects // 2:])
    galleries: tuple[list[int], list[int]] = ([], [])
    enrolled: set[int] = set()
    for gallery, half in zip(galleries, halves, strict=True):
        for subject in sorted(half):
            chosen = subject_templates[subject][int(rng.integers(len(subject_templates[subject])))]
            gallery.append(chosen)
            enrolled.add(chosen)
    probes = [t for t in all_templates if t not in enrolled]

    meta_dir = root / "meta"
    meta = {"tid_mid": meta_dir / f"{prefix}_face_tid_mid.txt",
            "pairs": meta_dir / f"{prefix}_template_pair_label.txt",
            "landmarks": meta_dir / f"{prefix}_name_5pts_score.txt",
            "gallery1": meta_dir / f"{prefix}_1N_gallery_{g1_name}.csv",
            "gallery2": meta_dir / f"{prefix}_1N_gallery_{g2_name}.csv",
            "probes": meta_dir / f"{prefix}_1N_probe_mixed.csv"}
    meta["tid_mid"].write_text("".join(f"{n} {images[n].template} {images[n].media}\n" for n in names))
    meta["pairs"].write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    meta["landmarks"].write_text("".join(
        f"{n} {' '.join(f'{v:.6f}' for v in images[n].landmarks.reshape(-1))} {images[n].score:.6f}\n"
        for n in names))
    for role, templates in (("gallery1", galleries[0]), ("gallery2", galleries[1]), ("probes", probes)):
        rows = [CSV_HEADER] + [f"{t},{template_subject[t]},{n},{images[n].media}"
                               for t in templates for n in template_images[t]]
        meta[role].write_text("\n".join(rows) + "\n")

    return IJBRelease(root=root, target=target, prefix=prefix, meta=meta, names=names, images=images,
                      template_subject=template_subject, template_images=template_images,
                      subject_identity=subject_identity, t1=t1, t2=t2, label=label,
                      gallery1=galleries[0], gallery2=galleries[1], probes=probes)


__all__ = ["ALIGNED_SIZE", "CSV_HEADER", "IJBImage", "IJBRelease", "write_ijb_release"]
