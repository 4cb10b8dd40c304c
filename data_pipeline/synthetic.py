"""Synthetic face identities: a deterministic, learnable-but-not-trivial stand-in for MS1M.

WHY: the demo run and the end-to-end tests must train on data that (a) needs no download,
(b) rewards a model that learns identity rather than pixels, and (c) is bit-identical wherever
it is built. Identity lives in STRUCTURE: face outline, the layout and sizes of eyes, brows,
nose and mouth, skin/hair/iris palette, hair style, beard, glasses, moles and freckles, and a skin
texture. Each image re-draws that structure under nuisances scaled by ``difficulty``: head yaw and
pitch (features move against the outline), expression, a 2-D affine pose (rotation, scale,
translation, shear), background and clothing, illumination gradient, brightness/contrast/gamma,
colour cast, blur, sensor noise, occlusions (sunglasses, mask, patches) and JPEG quality. The
nuisances defeat raw-pixel matching (see :func:`raw_pixel_baseline`), the structure stays visible.

Determinism: identity parameters come from ``rng([seed, 1, identity])`` and the nuisances of
image ``index`` from ``rng([seed, 2, identity, index])`` (numpy PCG64 via SeedSequence), so every
image is a pure function of ``(config, identity, index)`` and independent of how many processes
build the set. Held-out identities are numbered after the training ones, so they are disjoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_pipeline.binset import write_bin

#: Bump when the rendering changes: it is part of the cache key, so old caches are not reused.
GENERATOR_VERSION = 1
_IDENTITY_STREAM, _IMAGE_STREAM, _PAIR_STREAM = 1, 2, 3
_SUPERSAMPLE = 2  # draw at 2x and box-reduce: cheap anti-aliasing for PIL's aliased primitives
BIN_NAME = "synth_val.bin"
META_NAME = "synthetic.json"


@dataclass
class SyntheticConfig:
    """What to generate. Defaults build in ~10 s on 2 cores and a small CNN learns them in a few
    hundred CPU steps. ``num_pairs`` genuine/impostor pairs (50/50) come from the held-out
    identities, which never appear in training.

    This is also the ``data.synthetic`` section of fr_train's TrainConfig (one definition: the keys
    users set with ``--set data.synthetic.KEY=V`` are these fields). Not frozen, because the config
    tree is filled in key by key; :meth:`problems` is the one statement of what the generator
    accepts, checked on construction, before a build, and by fr_train's config validation.
    """

    num_identities: int = 200
    images_per_identity: int = 20
    holdout_identities: int = 100
    holdout_images_per_identity: int = 6
    num_pairs: int = 1000
    difficulty: float = 0.5
    image_size: int = 112
    """Side of the square crops; 64 makes CPU runs ~3x cheaper (the backbones size their head to it)."""
    seed: int = 0
    jpeg_quality_min: int = 40  # at difficulty 1 the quality is uniform in [min, max]
    jpeg_quality_max: int = 95

    def __post_init__(self) -> None:
        self.check()

    def problems(self) -> list[tuple[str, str, object]]:
        """Every setting the generator cannot build, as ``(field, what is valid and why, bad value)``.

        A list rather than an exception so that each caller words the error for its user: this class
        names the field, fr_train's config validation names the ``data.synthetic.*`` key."""
        found: list[tuple[str, str, object]] = []
        for name in ("num_identities", "images_per_identity", "holdout_identities", "num_pairs", "image_size"):
            if getattr(self, name) < 1:
                found.append((name, "must be >= 1", getattr(self, name)))
        if self.holdout_identities < 2:
            found.append(("holdout_identities", "must be >= 2 (impostor pairs need two identities)",
                          self.holdout_identities))
        if self.holdout_images_per_identity < 2:
            found.append(("holdout_images_per_identity", "must be >= 2 (genuine pairs need two images)",
                          self.holdout_images_per_identity))
        if self.num_pairs % 2:
            found.append(("num_pairs", "must be even (half genuine, half impostor)", self.num_pairs))
        genuine_available = self.holdout_identities * math.comb(max(self.holdout_images_per_identity, 0), 2)
        if self.num_pairs // 2 > genuine_available:
            found.append(("num_pairs", f"asks for {self.num_pairs // 2} genuine pairs but only {genuine_available} "
                          "distinct ones exist; add held-out identities or images, or ask for fewer pairs",
                          self.num_pairs))
        if not 0.0 <= self.difficulty <= 1.0:
            found.append(("difficulty", "must be in [0, 1]", self.difficulty))
        if not 1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 100:
            found.append(("jpeg_quality_min", f"must satisfy 1 <= jpeg_quality_min <= jpeg_quality_max "
                          f"({self.jpeg_quality_max}) <= 100", self.jpeg_quality_min))
        if self.image_size < 32:
            found.append(("image_size", "must be >= 32 to draw a face", self.image_size))
        return found

    def check(self) -> None:
        """Raise ValueError naming every field the generator cannot build (see :meth:`problems`)."""
        found = self.problems()
        if found:
            raise ValueError("SyntheticConfig: " + "; ".join(f"{name}: {msg} (got {value!r})"
                                                            for name, msg, value in found))

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Cache key: the config plus the generator version (sha256, hex)."""
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Identity: structure that defines who someone is
# ----------------------------------------------------------------------------------------------

_SKIN_LIGHT = np.array([245.0, 208.0, 178.0])
_SKIN_DARK = np.array([82.0, 52.0, 36.0])
_HAIR_PALETTE = np.array([[22, 18, 18], [70, 45, 28], [120, 80, 45], [205, 170, 100], [165, 65, 30],
                          [150, 150, 150], [232, 230, 222], [40, 40, 70]], dtype=np.float64)
_IRIS_PALETTE = np.array([[70, 40, 20], [40, 25, 15], [60, 110, 170], [70, 130, 90], [110, 110, 115]],
                         dtype=np.float64)


@dataclass(frozen=True)
class FaceIdentity:
    """Structural parameters of one identity, in canvas units (the image is the unit square)."""

    face_cy: float
    face_w: float  # half-width
    face_h: float  # half-height
    n_top: float  # superellipse exponents of the outline: lower = rounder/pointier
    n_bottom: float
    jaw_taper: float
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: int  # 0 short, 1 long, 2 receding, 3 fringe, 4 side part, 5 curly
    hairline: float
    ear_size: float
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    eye_tilt: float  # degrees
    iris: tuple[float, float, float]
    iris_ratio: float
    brow_gap: float
    brow_thick: float
    brow_len: float
    brow_angle: float  # degrees
    brow_arch: float
    nose_len: float
    nose_w: float
    nose_style: int
    mouth_dy: float  # below the nose tip
    mouth_w: float
    lip_thick: float
    mouth_curve: float
    lip: tuple[float, float, float]
    beard: int  # 0 none, 1 moustache, 2 full, 3 goatee
    glasses: int  # 0 none, 1 round, 2 square
    glasses_color: tuple[float, float, float]
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    freckles: tuple[tuple[float, float], ...]
    texture: tuple[float, float, float, float]  # amplitude, fx, fy, phase of a skin pattern


def _rgb(v: np.ndarray) -> tuple[float, float, float]:
    c = np.clip(v, 0, 255)
    return float(c[0]), float(c[1]), float(c[2])


@functools.lru_cache(maxsize=4096)  # pure function: caching only saves re-deriving it per image
def identity_params(seed: int, identity: int) -> FaceIdentity:
    """The structure of ``identity`` under ``seed`` (pure function)."""
    r = np.random.default_rng([seed, _IDENTITY_STREAM, identity])
    u = r.uniform
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * u() ** 1.3 + r.normal(0, 10, 3)
    hair = _HAIR_PALETTE[r.integers(len(_HAIR_PALETTE))] + r.normal(0, 12, 3)
    face_cy = u(0.50, 0.56)
    face_h = u(0.30, 0.38)
    eye_y = face_cy - u(0.02, 0.10)
    nose_len = u(0.08, 0.15)
    n_moles = int(r.integers(0, 4))
    moles = tuple((0.5 + u(-0.2, 0.2), face_cy + u(-0.12, 0.2), u(0.006, 0.014)) for _ in range(n_moles))
    freckles: tuple[tuple[float, float], ...] = ()
    if u() < 0.3:
        freckles = tuple((0.5 + s * u(0.05, 0.2), eye_y + u(0.03, 0.12))
                         for s in (-1, 1) for _ in range(int(r.integers(6, 16))))
    return FaceIdentity(
        face_cy=face_cy, face_w=u(0.24, 0.32), face_h=face_h, n_top=u(1.8, 3.0), n_bottom=u(1.5, 2.8),
        jaw_taper=u(0.0, 0.35), skin=_rgb(skin), hair=_rgb(hair), hair_style=int(r.integers(6)),
        hairline=u(0.06, 0.2), ear_size=u(0.04, 0.08),
        eye_y=eye_y, eye_dx=u(0.09, 0.15), eye_w=u(0.04, 0.07), eye_h=u(0.016, 0.03), eye_tilt=u(-10, 10),
        iris=_rgb(_IRIS_PALETTE[r.integers(len(_IRIS_PALETTE))] + r.normal(0, 10, 3)), iris_ratio=u(0.45, 0.8),
        brow_gap=u(0.025, 0.065), brow_thick=u(0.008, 0.028), brow_len=u(0.8, 1.4), brow_angle=u(-15, 15),
        brow_arch=u(0.0, 0.02), nose_len=nose_len, nose_w=u(0.025, 0.06), nose_style=int(r.integers(3)),
        mouth_dy=u(0.04, 0.09), mouth_w=u(0.05, 0.1), lip_thick=u(0.008, 0.024), mouth_curve=u(-0.02, 0.02),
        lip=_rgb(skin * 0.55 + np.array([150.0, 40.0, 50.0]) * 0.45 + r.normal(0, 10, 3)),
        beard=int(r.choice(4, p=[0.7, 0.1, 0.1, 0.1])), glasses=int(r.choice(3, p=[0.8, 0.1, 0.1])),
        glasses_color=_rgb(r.uniform(0, 200, 3)), moles=moles, freckles=freckles,
        texture=(u(0.0, 0.12), u(8, 30), u(8, 30), u(0, 2 * math.pi)),
    )


# ----------------------------------------------------------------------------------------------
# Nuisance: what changes from one photo of a person to the next
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nuisance:
    yaw: float
    pitch: float
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float
    background: tuple[float, float, float]
    clutter: tuple[tuple[int, float, float, float, float, tuple[float, float, float]], ...]
    clothing: tuple[float, float, float]
    angle: float  # degrees
    scale: float
    shift: tuple[float, float]  # fraction of the image
    shear: float
    light_dir: float  # radians
    light_strength: float
    brightness: float
    contrast: float
    gamma: float
    channel_gain: tuple[float, float, float]
    blur: float  # Gaussian radius in output pixels
    noise: float  # std of Gaussian noise, in grey levels
    occluder: int  # 0 none, 1 sunglasses, 2 face mask, 3 random patch
    occluder_box: tuple[float, float, float, float]
    occluder_color: tuple[float, float, float]
    jpeg_quality: int


def sample_nuisance(cfg: SyntheticConfig, identity: int, index: int) -> Nuisance:
    """The nuisances of image ``index`` of ``identity`` (pure function; scaled by difficulty)."""
    d = cfg.difficulty
    r = np.random.default_rng([cfg.seed, _IMAGE_STREAM, identity, index])
    draws = iter(r.random(48).tolist())  # one vectorised draw: per-call Generator overhead dominates

    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * next(draws)

    def colour() -> tuple[float, float, float]:
        return u(0, 255), u(0, 255), u(0, 255)

    def scene_colour(neutral: float) -> tuple[float, float, float]:
        # background/clothing: fully random from difficulty 0.5 up, a fixed neutral at difficulty 0
        w = min(1.0, 2.0 * d)
        return tuple(neutral + w * (c - neutral) for c in colour())  # type: ignore[return-value]

    clutter = tuple((int(c[0] < 0.5), -0.1 + 1.1 * c[1], -0.1 + 1.1 * c[2], 0.05 + 0.35 * c[3], 0.05 + 0.35 * c[4],
                     (255 * c[5], 255 * c[6], 255 * c[7]))
                    for c in r.random((int(r.poisson(4 * d)), 8)).tolist())
    roll, kind = u(), u()
    occluder = 1 + min(2, int(3 * kind)) if roll < 0.35 * d else 0
    q_hi = cfg.jpeg_quality_max
    q_lo = round(q_hi - d * (q_hi - cfg.jpeg_quality_min))
    return Nuisance(
        yaw=u(-1, 1) * d, pitch=u(-1, 1) * d, smile=u(-0.5, 1.0) * 0.025 * d,
        mouth_open=max(0.0, u(-0.5, 1.0)) * 0.03 * d, eye_open=1.0 - d * u(0, 0.7) ** 2,
        brow_raise=u(-1, 1) * 0.015 * d,
        background=scene_colour(150.0), clutter=clutter, clothing=scene_colour(90.0),
        # in-plane pose is modest: real training sets are landmark-aligned crops with residual error
        angle=u(-1, 1) * 16 * d, scale=math.exp(u(-1, 1) * 0.15 * d),
        shift=(u(-1, 1) * 0.07 * d, u(-1, 1) * 0.07 * d), shear=u(-1, 1) * 0.12 * d,
        light_dir=u(0, 2 * math.pi), light_strength=u(0, 1.4) * d,
        brightness=u(-1, 1) * 50 * d, contrast=math.exp(u(-1, 1) * 0.5 * d), gamma=math.exp(u(-1, 1) * 0.5 * d),
        channel_gain=(math.exp(u(-1, 1) * 0.25 * d), math.exp(u(-1, 1) * 0.25 * d), math.exp(u(-1, 1) * 0.25 * d)),
        blur=u(0, 1.8) * d, noise=u(0, 16) * d,
        occluder=occluder, occluder_box=(u(0, 1), u(0, 1), u(0.2, 0.45), u(0.15, 0.4)), occluder_color=colour(),
        jpeg_quality=min(q_hi, q_lo + int(u() * (q_hi - q_lo + 1))),
    )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _shade(c: tuple[float, float, float], f: float) -> tuple[int, int, int]:
    return (min(255, max(0, round(c[0] * f))), min(255, max(0, round(c[1] * f))),
            min(255, max(0, round(c[2] * f))))


def _ellipse_poly(cx: float, cy: float, rx: float, ry: float, angle_deg: float, n: int = 20) -> list[tuple]:
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    return pts


class _Canvas:
    """Draws in unit face coordinates; yaw/pitch move each point by its depth (nose 1, outline 0),
    a cheap stand-in for out-of-plane head rotation. The map is separable and affine per axis
    (x' = ax·x + bx + cx·depth), so axis-aligned ellipses stay axis-aligned ellipses."""

    def __init__(self, size: int, f: FaceIdentity, nz: Nuisance) -> None:
        self.size = size
        self.f = f
        self.nz = nz
        self.image = Image.new("RGB", (size, size), _shade(nz.background, 1.0))
        self.draw = ImageDraw.Draw(self.image)
        sx = 1 - 0.1 * abs(nz.yaw)
        sy = 1 - 0.08 * abs(nz.pitch)
        self._ax, self._bx, self._cx = sx * size, 0.5 * (1 - sx) * size, nz.yaw * 0.07 * size
        self._ay, self._by, self._cy = sy * size, f.face_cy * (1 - sy) * size, nz.pitch * 0.05 * size

    def poly(self, pts: list[tuple[float, float]], depth: float, fill: tuple[int, int, int]) -> None:
        ax, bx, ay, by = self._ax, self._bx + self._cx * depth, self._ay, self._by + self._cy * depth
        self.draw.polygon([(ax * x + bx, ay * y + by) for x, y in pts], fill=fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, depth: float, fill: tuple[int, int, int],
                angle: float = 0.0, n: int = 16) -> None:
        if angle:
            self.poly(_ellipse_poly(cx, cy, rx, ry, angle, n), depth, fill)
            return
        ax, bx, ay, by = self._ax, self._bx + self._cx * depth, self._ay, self._by + self._cy * depth
        self.draw.ellipse((ax * (cx - rx) + bx, ay * (cy - ry) + by, ax * (cx + rx) + bx, ay * (cy + ry) + by),
                          fill=fill)

    def line(self, pts: list[tuple[float, float]], depth: float, fill: tuple[int, int, int], width: float) -> None:
        ax, bx, ay, by = self._ax, self._bx + self._cx * depth, self._ay, self._by + self._cy * depth
        self.draw.line([(ax * x + bx, ay * y + by) for x, y in pts], fill=fill, width=max(1, round(width * self.size)))


@functools.lru_cache(maxsize=4096)
def _outline(f: FaceIdentity, n: int = 40) -> list[tuple[float, float]]:
    """Face outline: a superellipse with separate top/bottom exponents and a tapered jaw."""
    pts = []
    for t in np.linspace(0, 2 * math.pi, n, endpoint=False):
        c, s = math.cos(t), math.sin(t)
        e = 2.0 / (f.n_bottom if s > 0 else f.n_top)
        x = math.copysign(abs(c) ** e, c) * f.face_w
        y = math.copysign(abs(s) ** e, s) * f.face_h
        if s > 0:
            x *= 1 - f.jaw_taper * s**2
        pts.append((0.5 + x, f.face_cy + y))
    return pts


def _draw_face(cv: _Canvas) -> None:
    f, nz = cv.f, cv.nz
    skin = _shade(f.skin, 1.0)
    hair = _shade(f.hair, 1.0)
    top = f.face_cy - f.face_h
    # body and neck
    cv.poly([(0.5 - 0.45, 1.05), (0.5 - 0.3, 0.88), (0.5 + 0.3, 0.88), (0.5 + 0.45, 1.05)], 0.0,
            _shade(nz.clothing, 1.0))
    cv.poly([(0.5 - 0.09, f.face_cy + f.face_h * 0.6), (0.5 + 0.09, f.face_cy + f.face_h * 0.6),
             (0.5 + 0.1, 0.92), (0.5 - 0.1, 0.92)], 0.0, _shade(f.skin, 0.85))
    # hair behind the head
    if f.hair_style == 1:  # long hair: a rounded mass from the crown down to the shoulders
        cv.ellipse(0.5, f.face_cy + 0.05, f.face_w * 1.3, f.face_h * 1.05, -0.3, hair)
        cv.poly([(0.5 - f.face_w * 1.3, f.face_cy + 0.05), (0.5 + f.face_w * 1.3, f.face_cy + 0.05),
                 (0.5 + f.face_w * 1.25, f.face_cy + f.face_h * 1.1), (0.5 - f.face_w * 1.25, f.face_cy + f.face_h * 1.1)],
                -0.3, hair)
    if f.hair_style != 2:
        cv.ellipse(0.5, top + f.face_h * 0.55, f.face_w * 1.12, f.face_h * 0.7, -0.2, hair)
    # ears
    for side in (-1, 1):
        cv.ellipse(0.5 + side * f.face_w * 0.98, f.eye_y + 0.03, f.ear_size * 0.55, f.ear_size, -0.2,
                   _shade(f.skin, 0.9))
    cv.poly(_outline(f), 0.0, skin)
    # hair in front: fringe / part / curls
    if f.hair_style in (0, 1, 3, 4, 5):
        line_y = top + f.hairline * (0.5 if f.hair_style == 3 else 1.0)
        pts = [(0.5 - f.face_w * 1.05, line_y + 0.06), (0.5 - f.face_w * 0.7, top - 0.01),
               (0.5 + f.face_w * 0.7, top - 0.01), (0.5 + f.face_w * 1.05, line_y + 0.06)]
        if f.hair_style == 4:
            pts += [(0.5 + f.face_w * 0.6, line_y), (0.5 - f.face_w * 0.2, line_y - 0.03)]
        elif f.hair_style == 3:
            pts += [(0.5 + f.face_w * 0.8, f.eye_y - f.brow_gap - 0.03), (0.5 - f.face_w * 0.8, f.eye_y - f.brow_gap - 0.03)]
        else:
            pts += [(0.5 + f.face_w * 0.5, line_y), (0.5 - f.face_w * 0.5, line_y)]
        cv.poly(pts, 0.1, hair)
        if f.hair_style == 5:
            for k in range(7):
                cv.ellipse(0.5 + (k - 3) * f.face_w * 0.3, top + 0.01, 0.04, 0.035, 0.1, hair)
    # skin details
    for x, y in f.freckles:
        cv.ellipse(x, y, 0.006, 0.006, 0.3, _shade(f.skin, 0.78), n=6)
    for x, y, rad in f.moles:
        cv.ellipse(x, y, rad, rad, 0.3, _shade(f.skin, 0.45), n=8)
    # eyes and brows
    for side in (-1, 1):
        ex = 0.5 + side * f.eye_dx
        tilt = side * f.eye_tilt
        h = f.eye_h * nz.eye_open
        cv.ellipse(ex, f.eye_y, f.eye_w, max(h, 0.003), 0.4, (240, 238, 232), angle=tilt)
        if h > 0.006:
            ir = min(f.eye_w * f.iris_ratio * 0.6, h)
            cv.ellipse(ex + nz.yaw * 0.01, f.eye_y, ir, ir, 0.5, _shade(f.iris, 1.0), n=12)
            cv.ellipse(ex + nz.yaw * 0.01, f.eye_y, ir * 0.45, ir * 0.45, 0.5, (10, 10, 10), n=8)
        cv.line([(ex - f.eye_w, f.eye_y), (ex, f.eye_y - h), (ex + f.eye_w, f.eye_y)], 0.4,
                _shade(f.skin, 0.5), 0.008)
        by = f.eye_y - f.eye_h - f.brow_gap - nz.brow_raise
        half = f.eye_w * f.brow_len
        a = math.radians(side * f.brow_angle)
        cv.line([(ex - half * math.cos(a), by - side * half * math.sin(a)),
                 (ex, by - f.brow_arch),
                 (ex + half * math.cos(a), by + side * half * math.sin(a))], 0.45,
                _shade(f.hair, 0.8), f.brow_thick)
    # nose
    ny = f.eye_y + f.nose_len
    dark = _shade(f.skin, 0.62)
    if f.nose_style == 0:
        cv.poly([(0.5, f.eye_y + 0.01), (0.5 + f.nose_w, ny), (0.5 - f.nose_w, ny)], 1.0, _shade(f.skin, 0.88))
    else:
        cv.line([(0.5 - 0.01, f.eye_y + 0.02), (0.5 - f.nose_w * 0.3, ny - 0.01), (0.5 + f.nose_w * 0.2, ny)], 1.0,
                dark, 0.01)
    for side in (-1, 1):
        cv.ellipse(0.5 + side * f.nose_w * 0.5, ny, f.nose_w * 0.3, 0.008, 1.0, dark, n=8)
    # mouth (expression bends and opens it)
    my = ny + f.mouth_dy
    curve = f.mouth_curve + nz.smile
    if f.beard == 2:
        cv.poly([(0.5 - f.face_w * 0.95, f.face_cy + 0.02), (0.5 - f.face_w * 0.6, f.face_cy + f.face_h * 0.95),
                 (0.5 + f.face_w * 0.6, f.face_cy + f.face_h * 0.95), (0.5 + f.face_w * 0.95, f.face_cy + 0.02),
                 (0.5 + f.mouth_w * 1.2, my - 0.02), (0.5 - f.mouth_w * 1.2, my - 0.02)], 0.5, _shade(f.hair, 0.9))
    elif f.beard == 3:
        cv.ellipse(0.5, my + 0.05, f.mouth_w * 0.7, 0.04, 0.6, _shade(f.hair, 0.9))
    if f.beard in (1, 2):
        cv.line([(0.5 - f.mouth_w * 1.1, my - 0.005), (0.5, my - 0.025), (0.5 + f.mouth_w * 1.1, my - 0.005)], 0.7,
                _shade(f.hair, 0.9), 0.02)
    if nz.mouth_open > 0.004:
        cv.ellipse(0.5, my + nz.mouth_open * 0.5, f.mouth_w * 0.8, nz.mouth_open, 0.6, (60, 20, 25), n=12)
    cv.line([(0.5 - f.mouth_w, my - curve), (0.5, my), (0.5 + f.mouth_w, my - curve)], 0.6, _shade(f.lip, 1.0),
            f.lip_thick)
    # glasses
    if f.glasses:
        gc = _shade(f.glasses_color, 1.0)
        for side in (-1, 1):
            ex = 0.5 + side * f.eye_dx
            rx, ry = f.eye_w * 1.5, f.eye_w * (1.2 if f.glasses == 1 else 0.9)
            pts = (_ellipse_poly(ex, f.eye_y, rx, ry, 0, 16) if f.glasses == 1 else
                   [(ex - rx, f.eye_y - ry), (ex + rx, f.eye_y - ry), (ex + rx, f.eye_y + ry), (ex - rx, f.eye_y + ry)])
            cv.line([*pts, pts[0]], 0.45, gc, 0.009)
        cv.line([(0.5 - f.eye_dx + f.eye_w * 1.5, f.eye_y), (0.5 + f.eye_dx - f.eye_w * 1.5, f.eye_y)], 0.45, gc, 0.008)
    # occluders attached to the face
    if nz.occluder == 1:
        for side in (-1, 1):
            cv.ellipse(0.5 + side * f.eye_dx, f.eye_y, f.eye_w * 1.6, f.eye_w * 1.2, 0.45, (15, 15, 20))
        cv.line([(0.5 - f.eye_dx, f.eye_y), (0.5 + f.eye_dx, f.eye_y)], 0.45, (15, 15, 20), 0.012)
    elif nz.occluder == 2:
        cv.poly([(0.5 - f.face_w * 1.0, ny - 0.02), (0.5 + f.face_w * 1.0, ny - 0.02),
                 (0.5 + f.face_w * 0.7, f.face_cy + f.face_h * 0.95), (0.5 - f.face_w * 0.7, f.face_cy + f.face_h * 0.95)],
                0.6, _shade(nz.occluder_color, 1.0))


def _affine_inverse(nz: Nuisance, out: int, src: int) -> tuple[float, ...]:
    """Coefficients (a..f) mapping output pixel (x, y) to canvas pixel, as PIL's AFFINE wants:
    canvas = M⁻¹ (out − c_out − t) + c_src with M = s·R(θ)·Shear(k) and the canvas→out ratio."""
    th = math.radians(nz.angle)
    c, s = math.cos(th), math.sin(th)
    k = nz.shear
    ratio = out / src
    # forward linear map (canvas → output): ratio·scale·R·[[1, k], [0, 1]]
    m = np.array([[c, c * k - s], [s, s * k + c]]) * (ratio * nz.scale)
    inv = np.linalg.inv(m)
    tx, ty = nz.shift[0] * out, nz.shift[1] * out
    co, cs = out / 2.0, src / 2.0
    # canvas = inv @ (p - co - t) + cs
    off = np.array([cs, cs]) - inv @ np.array([co + tx, co + ty])
    return float(inv[0, 0]), float(inv[0, 1]), float(off[0]), float(inv[1, 0]), float(inv[1, 1]), float(off[1])


def _photometric(img: Image.Image, nz: Nuisance, rng: np.random.Generator) -> np.ndarray:
    """Colour cast, contrast, brightness and gamma (one per-channel lookup table), then an
    illumination gradient and luminance noise (numpy)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    src = np.asarray(img)
    x = np.empty(src.shape, dtype=np.float32)
    for c, gain in enumerate(nz.channel_gain):
        lut = np.clip((levels * gain - 0.5) * nz.contrast + 0.5 + nz.brightness / 255.0, 0.0, 1.0) ** nz.gamma
        x[:, :, c] = (lut * 255.0).astype(np.float32)[src[:, :, c]]
    n = x.shape[0]
    g = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    light = 1.0 + 0.5 * nz.light_strength * (math.cos(nz.light_dir) * g[None, :] + math.sin(nz.light_dir) * g[:, None])
    x *= np.clip(light, 0.2, 2.0)[:, :, None]
    # luminance noise, one draw per pixel shared by the channels: the sum of two uniform bytes is
    # a triangular variate (std 104.5), close enough to sensor noise and ~10x cheaper than normal()
    raw = np.frombuffer(rng.bytes(2 * n * n), dtype=np.uint8).reshape(2, n, n, 1).astype(np.float32)
    x += (raw[0] + raw[1] - 255.0) * (nz.noise / 104.5) + 0.5
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def _texture_factor(f: FaceIdentity, size: int) -> np.ndarray:
    """Identity skin pattern (a slanted sinusoidal grain), multiplicative, on the canvas grid."""
    amp, fx, fy, ph = f.texture
    g = np.linspace(0.0, 1.0, size, dtype=np.float32)
    return 1.0 + amp * np.sin(2 * math.pi * (fx * g[None, :] + fy * g[:, None]) + ph)


def _render(cfg: SyntheticConfig, identity: int, index: int) -> tuple[np.ndarray, int]:
    f = identity_params(cfg.seed, identity)
    nz = sample_nuisance(cfg, identity, index)
    rng = np.random.default_rng([cfg.seed, _IMAGE_STREAM, identity, index, 1])  # pixel noise stream
    out = cfg.image_size
    src = out * _SUPERSAMPLE
    cv = _Canvas(src, f, nz)
    for kind, x, y, w, h, col in nz.clutter:  # background clutter, behind the person
        box = (x * src, y * src, (x + w) * src, (y + h) * src)
        (cv.draw.rectangle if kind == 0 else cv.draw.ellipse)(box, fill=_shade(col, 1.0))
    _draw_face(cv)
    face = cv.image.reduce(_SUPERSAMPLE)
    if f.texture[0] > 0.01:  # skin grain where the plain skin colour is (mask by colour), face-attached
        arr = np.asarray(face)
        r, g, b = _shade(f.skin, 1.0)
        skin_mask = (arr[:, :, 0] == r) & (arr[:, :, 1] == g) & (arr[:, :, 2] == b)
        arr = arr * np.where(skin_mask, _texture_factor(f, out), np.float32(1.0))[:, :, None]
        face = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img = face.transform((out, out), Image.Transform.AFFINE, _affine_inverse(nz, out, out),
                         resample=Image.Resampling.BILINEAR, fillcolor=_shade(nz.background, 1.0))
    if nz.occluder == 3:
        bx, by, bw, bh = nz.occluder_box
        ImageDraw.Draw(img).rectangle((bx * out * 0.8, by * out * 0.8, (bx * 0.8 + bw) * out, (by * 0.8 + bh) * out),
                                      fill=_shade(nz.occluder_color, 1.0))
    if nz.blur > 0.5:
        img = img.filter(ImageFilter.BoxBlur(nz.blur))
    return _photometric(img, nz, rng), nz.jpeg_quality


def render_image(cfg: SyntheticConfig, identity: int, index: int) -> np.ndarray:
    """Image ``index`` of ``identity``: ``image_size x image_size x 3`` uint8 RGB (deterministic)."""
    return _render(cfg, identity, index)[0]


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG (4:2:0, no optimisation: deterministic bytes for a given libjpeg)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def render_jpeg(cfg: SyntheticConfig, identity: int, index: int) -> bytes:
    """Image ``index`` of ``identity`` encoded at its own (nuisance) JPEG quality."""
    img, quality = _render(cfg, identity, index)
    return encode_jpeg(img, quality)


# ----------------------------------------------------------------------------------------------
# Dataset: training rec/idx (insightface layout) + held-out pairs (.bin)
# ----------------------------------------------------------------------------------------------


def holdout_identity(cfg: SyntheticConfig, k: int) -> int:
    """Held-out identities are numbered after the training ones: disjoint by construction."""
    return cfg.num_identities + k


def verification_pairs(cfg: SyntheticConfig) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """``num_pairs`` distinct pairs ``(identity_a, index_a, identity_b, index_b)`` over held-out
    identities, alternating genuine/impostor so that every contiguous fold is balanced."""
    r = np.random.default_rng([cfg.seed, _PAIR_STREAM])
    n_img = cfg.holdout_images_per_identity
    half = cfg.num_pairs // 2
    genuine_all = [(k, i, j) for k in range(cfg.holdout_identities) for i in range(n_img) for j in range(i + 1, n_img)]
    genuine = [genuine_all[t] for t in r.choice(len(genuine_all), size=half, replace=False)]
    impostor: list[tuple[int, int, int, int]] = []
    seen: set[tuple[int, int, int, int]] = set()
    while len(impostor) < half:
        a, b = r.choice(cfg.holdout_identities, size=2, replace=False)
        i, j = r.integers(n_img, size=2)
        key = (int(a), int(i), int(b), int(j))
        if key not in seen and (key[2], key[3], key[0], key[1]) not in seen:
            seen.add(key)
            impostor.append(key)
    pairs: list[tuple[int, int, int, int]] = []
    for (k, i, j), (a, ia, b, ib) in zip(genuine, impostor, strict=True):
        pairs.append((holdout_identity(cfg, k), i, holdout_identity(cfg, k), j))
        pairs.append((holdout_identity(cfg, a), ia, holdout_identity(cfg, b), ib))
    issame = np.tile(np.array([True, False]), half)
    return pairs, issame


def _render_identity(args: tuple[SyntheticConfig, int, int]) -> list[bytes]:
    cfg, identity, count = args
    return [render_jpeg(cfg, identity, i) for i in range(count)]


@contextlib.contextmanager
def _renderer(workers: int) -> Iterator[Callable[[SyntheticConfig, list[int], int], Iterator[list[bytes]]]]:
    """A function mapping identities to their JPEGs, in order, on ``workers`` processes. The bytes do
    not depend on ``workers``: each image is a pure function of its seed triple."""
    if workers <= 1:
        yield lambda cfg, identities, count: map(_render_identity, [(cfg, i, count) for i in identities])
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may hold torch/Ray threads whose locks fork would copy mid-use
    # (a script calling this must therefore guard its entry point with `if __name__ == "__main__"`)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        def run(cfg: SyntheticConfig, identities: list[int], count: int) -> Iterator[list[bytes]]:
            jobs = [(cfg, i, count) for i in identities]
            return pool.map(_render_identity, jobs, chunksize=max(1, len(jobs) // (8 * workers)))

        yield run


def build_verification_set(cfg: SyntheticConfig, workers: int = 2) -> tuple[list[bytes], np.ndarray]:
    """The held-out pairs as ``.bin`` content: (JPEGs, images 2i and 2i+1 form pair i; issame)."""
    with _renderer(workers) as render:
        return _verification_set(cfg, render)


def _verification_set(cfg: SyntheticConfig, render: Callable[[SyntheticConfig, list[int], int], Iterator[list[bytes]]]
                      ) -> tuple[list[bytes], np.ndarray]:
    holdout = [holdout_identity(cfg, k) for k in range(cfg.holdout_identities)]
    jpegs = dict(zip(holdout, render(cfg, holdout, cfg.holdout_images_per_identity), strict=True))
    pairs, issame = verification_pairs(cfg)
    images = [img for a, ia, b, ib in pairs for img in (jpegs[a][ia], jpegs[b][ib])]
    return images, issame


def write_synthetic_dataset(out_dir: str | Path, cfg: SyntheticConfig, workers: int = 2) -> Path:
    """Write ``train.rec/.idx/property`` (insightface layout, via data_pipeline.pack), the held-out
    pairs as ``synth_val.bin`` and ``synthetic.json`` (config, hash, content fingerprint)."""
    from data_pipeline.pack import write_insightface_dataset

    cfg.check()  # the config is mutable (a TrainConfig section): refuse a value changed since construction
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    n_train = 0

    def samples(render: Callable[[SyntheticConfig, list[int], int], Iterator[list[bytes]]]
                ) -> Iterator[tuple[int, bytes]]:
        nonlocal n_train
        for label, jpegs in enumerate(render(cfg, list(range(cfg.num_identities)), cfg.images_per_identity)):
            for jpeg in jpegs:
                digest.update(len(jpeg).to_bytes(8, "little"))
                digest.update(jpeg)
                n_train += 1
                yield label, jpeg

    with _renderer(workers) as render:
        write_insightface_dataset(out, samples(render), cfg.num_identities, (cfg.image_size, cfg.image_size))
        images, issame = _verification_set(cfg, render)
    for b in images:
        digest.update(len(b).to_bytes(8, "little"))
        digest.update(b)
    digest.update(issame.tobytes())
    write_bin(out / BIN_NAME, images, issame)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "fingerprint": digest.hexdigest(),
        "num_train_images": n_train,
        "num_classes": cfg.num_identities,
        "num_pairs": int(issame.size),
        "val_bin": BIN_NAME,
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def ensure_synthetic_dataset(cache_dir: str | Path, cfg: SyntheticConfig, workers: int = 2) -> Path:
    """The dataset for ``cfg`` under ``cache_dir/synthetic-<hash>``, built once.

    Atomic: the set is built in a temporary sibling directory and renamed into place, so a crashed
    or concurrent build never leaves a half-written directory behind the final name.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = cfg.config_hash()
    final = cache / f"synthetic-{key[:16]}"
    if (final / META_NAME).is_file():
        meta = json.loads((final / META_NAME).read_text())
        if meta.get("config_hash") != key:
            raise ValueError(f"{final / META_NAME}: config_hash {meta.get('config_hash')} does not match {key}; "
                             f"the cache entry is foreign or corrupt, delete {final} to rebuild it")
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".synthetic-{key[:16]}.", suffix=".tmp", dir=cache))
    try:
        write_synthetic_dataset(tmp, cfg, workers=workers)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_NAME).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# Hardness check
# ----------------------------------------------------------------------------------------------
