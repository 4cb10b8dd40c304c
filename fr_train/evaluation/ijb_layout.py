"""insightface's IJB-B / IJB-C release on disk: where each file is, and its text formats.

One home for the layout ``fr_eval --ijb DIR`` reads (the release insightface distributes for
``eval_ijbc.py``)::

    DIR/                      (or DIR/IJBC/, DIR/IJBB/)
      loose_crop/1.jpg …      the images, JPEG or PNG
      meta/ijbc_face_tid_mid.txt          image template_id media_id
      meta/ijbc_template_pair_label.txt   t1 t2 label            (1:1; 15,658,489 lines for IJB-C)
      meta/ijbc_name_5pts_score.txt       image x1 y1 … x5 y5 score (data_pipeline/five_points.py)
      meta/ijbc_1N_gallery_G1.csv, …_G2.csv, ijbc_1N_probe_mixed.csv   (1:N; IJB-B: S1, S2)

The 1:N CSVs have a header row naming at least ``TEMPLATE_ID`` and ``SUBJECT_ID`` and one row per
image; only those two columns are read, and a template's images and media come from the tid/mid
file, as for 1:1. Every reader refuses bad text with the file, the line and the fix
(DataFormatError): users of the published scripts meet misplaced or renamed meta files first
(insightface #556, #920), so a missing file names the path it looked for.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import data_error

TARGETS = {"IJBC": ("ijbc", ("G1", "G2")), "IJBB": ("ijbb", ("S1", "S2"))}
_RELEASE_FIX = ("Pass the directory of insightface's IJB release (the one holding meta/ and loose_crop/, "
                "e.g. IJB_release/IJBC), with the meta files under their published names")


@dataclass(frozen=True)
class IJBRelease:
    """The files of one target (IJBC or IJBB) of a release; ``gallery``/``probes`` None without 1:N files."""

    root: Path
    target: str
    images: Path
    tid_mid: Path
    pairs: Path
    landmarks: Path
    gallery: tuple[Path, Path] | None
    probes: Path | None


def _meta_dirs(root: Path) -> list[Path]:
    return [d for d in (root, root / "IJBC", root / "IJBB") if (d / "meta").is_dir()]


def find_release(root: str | Path, target: str | None = None) -> IJBRelease:
    """Locate the release under ``root``; the target is read from the meta file names unless given."""
    root = Path(root)
    if not root.is_dir():
        raise data_error(root, "", "no such directory", _RELEASE_FIX)
    if target is not None and target.upper() not in TARGETS:
        raise ValueError(f"--ijb-target {target!r}: choose IJBB or IJBC")
    found: list[tuple[str, Path]] = []
    for meta_parent in _meta_dirs(root):
        for name, (prefix, _) in TARGETS.items():
            if (meta_parent / "meta" / f"{prefix}_face_tid_mid.txt").is_file():
                found.append((name, meta_parent))
    if target is not None:
        found = [(n, d) for n, d in found if n == target.upper()]
    if not found:
        want = [f"meta/{TARGETS[t][0]}_face_tid_mid.txt" for t in ([target.upper()] if target else TARGETS)]
        raise data_error(root, "", f"holds no {' or '.join(want)} (looked in {root} and its IJBC/, IJBB/)",
                         _RELEASE_FIX)
    if len({n for n, _ in found}) > 1:
        raise data_error(root, "", "holds both IJB-B and IJB-C meta files", "Pass --ijb-target IJBB or IJBC")
    name, base = found[0]
    prefix, (g1, g2) = TARGETS[name]
    meta = base / "meta"

    def need(filename: str) -> Path:
        path = meta / filename
        if not path.is_file():
            raise data_error(path, "", "missing", _RELEASE_FIX)
        return path

    images = base / "loose_crop"
    if not images.is_dir():
        raise data_error(images, "", "missing (the release's images)", _RELEASE_FIX)
    one_n = [meta / f"{prefix}_1N_gallery_{g1}.csv", meta / f"{prefix}_1N_gallery_{g2}.csv",
             meta / f"{prefix}_1N_probe_mixed.csv"]
    present = [p.is_file() for p in one_n]
    if any(present) and not all(present):
        missing = [str(p) for p, ok in zip(one_n, present, strict=True) if not ok]
        raise data_error(missing[0], "", f"missing while the other 1:N files are present ({', '.join(missing)})",
                         "Restore the 1:N gallery and probe CSVs of the release, or remove all three to score 1:1 only")
    return IJBRelease(root=base, target=name, images=images, tid_mid=need(f"{prefix}_face_tid_mid.txt"),
                      pairs=need(f"{prefix}_template_pair_label.txt"), landmarks=need(f"{prefix}_name_5pts_score.txt"),
                      gallery=(one_n[0], one_n[1]) if all(present) else None,
                      probes=one_n[2] if all(present) else None)


@dataclass(frozen=True)
class TemplateMedia:
    """The tid/mid file: image ``names[i]`` belongs to template ``templates[i]``, media ``media[i]``."""

    path: Path
    names: list[str]
    templates: np.ndarray  # (n,) int64
    media: np.ndarray  # (n,) int64


def read_template_media(path: str | Path) -> TemplateMedia:
    """Parse ``image template_id media_id`` lines (469,375 for IJB-C: one split, no per-line Python work
    beyond the check that names the first bad line)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [line.split() for line in lines]
    fix = "Each line of a *_face_tid_mid.txt is 'IMAGE TEMPLATE_ID MEDIA_ID' (two integers after the name)"
    names: list[str] = []
    ids: list[str] = []
    for number, fields in enumerate(rows, start=1):
        if not fields:
            continue
        if len(fields) != 3 or not (fields[1].isdigit() and fields[2].isdigit()):
            raise data_error(path, f"line {number}", f"expected 'IMAGE TEMPLATE_ID MEDIA_ID', got "
                             f"{lines[number - 1].strip()!r}", fix)
        names.append(fields[0])
        ids.append(fields[1])
        ids.append(fields[2])
    table = np.asarray(ids, dtype=np.int64).reshape(-1, 2)
    if not names:
        raise data_error(path, "", "lists no image", fix)
    return TemplateMedia(path=path, names=names, templates=table[:, 0].copy(), media=table[:, 1].copy())


def read_template_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t1, t2, label)`` int64/int64/int8 from ``t1 t2 label`` lines (int64 ids: 250 MB for IJB-C's pairs;
    the text reader's (P, 3) table is freed on return). numpy's C text reader: ~2.5 s for
    IJB-C's 15.7M lines here; its message names the bad row, which becomes the line in ours."""
    path = Path(path)
    fix = "Each line of a *_template_pair_label.txt is 'TEMPLATE_1 TEMPLATE_2 LABEL' (integers, LABEL 1 or 0)"
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        _name_bad_pair_line(path, fix)
        raise
    if table.size == 0:
        raise data_error(path, "", "lists no pair", fix)
    if table.shape[1] != 3:
        raise data_error(path, "line 1", f"has {table.shape[1]} fields, want 3", fix)
    labels = table[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise data_error(path, f"line {int(bad[0]) + 1}", f"label {int(labels[bad[0]])} is neither 1 nor 0", fix)
    return table[:, 0].copy(), table[:, 1].copy(), labels.astype(np.int8)


def _name_bad_pair_line(path: Path, fix: str) -> None:
    """The error path only: find the first line numpy refused, in Python, and raise naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if fields and (len(fields) != 3 or not all(v.lstrip("-").isdigit() for v in fields)):
                raise data_error(path, f"line {number}", f"expected 'TEMPLATE_1 TEMPLATE_2 LABEL', got "
                                 f"{line.strip()!r}", fix)
    raise data_error(path, "", "cannot be read as three integer columns", fix)


def read_1n_templates(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(template_ids, subject_ids)``, one entry per template in first-seen order, from a 1:N CSV."""
    path = Path(path)
    fix = "A 1:N gallery/probe CSV has a header row naming TEMPLATE_ID and SUBJECT_ID, then one row per image"
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise data_error(path, "", "is empty", fix)
        columns = [h.strip().upper() for h in header]
        try:
            t_col, s_col = columns.index("TEMPLATE_ID"), columns.index("SUBJECT_ID")
        except ValueError:
            raise data_error(path, "line 1", f"header {header!r} names no TEMPLATE_ID or no SUBJECT_ID", fix) from None
        subject_of: dict[int, int] = {}
        line_of: dict[int, int] = {}
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                template, subject = int(row[t_col]), int(row[s_col])
            except (IndexError, ValueError):
                raise data_error(path, f"line {number}", f"no integer TEMPLATE_ID/SUBJECT_ID in {row!r}", fix) from None
            seen = subject_of.setdefault(template, subject)
            line_of.setdefault(template, number)
            if seen != subject:
                raise data_error(path, f"lines {line_of[template]} and {number}",
                                 f"template {template} is given subjects {seen} and {subject}",
                                 "A template shows one subject; restore the file from the release")
    if not subject_of:
        raise data_error(path, "", "lists no template", fix)
    return np.fromiter(subject_of.keys(), np.int64), np.fromiter(subject_of.values(), np.int64)


__all__ = ["TARGETS", "IJBRelease", "TemplateMedia", "find_release", "read_1n_templates", "read_template_media",
           "read_template_pairs"]
