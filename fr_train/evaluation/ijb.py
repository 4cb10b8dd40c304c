"""IJB-B / IJB-C evaluation of any face model: 1:1 verification and 1:N identification, as published.

The protocol (insightface's ``eval_ijbc.py``, which the papers' tables use): each image is aligned
from its five landmarks (data_pipeline/face_align.py), embedded with its mirror, the two summed
un-normalised; by default that feature's norm stays as a quality weight and is multiplied by the
detector score (``IJBOptions`` turns each part off). A template is the L2-normalised sum over its
media of the mean over each media's images; a score is the cosine of two templates
(ijb_scoring.py holds the math). 1:1 reports TAR at six FARs under two named operating-point
rules; 1:N rank-1/5/10 and TPIR at FPIR 0.01/0.1 (ijb_scoring.open_set_identification).

Everything the release lists is checked before the first image is embedded — an unknown template
in a pair, a 1:N template absent from the tid/mid file, an image without landmarks or missing on
disk — so a broken release fails in seconds, not after an hour of extraction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import data_error
from data_pipeline.five_points import read_five_points
from fr_train.evaluation import ijb_scoring as scoring
from fr_train.evaluation.embedders import Embedder
from fr_train.evaluation.ijb_features import (
    ImageFeatures,
    extract_features,
    load_features,
    model_fingerprint,
    save_features,
)
from fr_train.evaluation.ijb_layout import (
    IJBRelease,
    TemplateMedia,
    find_release,
    read_1n_templates,
    read_template_media,
    read_template_pairs,
)


@dataclass(frozen=True)
class IJBOptions:
    flip: bool = True
    norm_weight: bool = True
    detector_weight: bool = True
    batch_size: int = 128
    threads: int = 4
    features: Path | None = None  # load from here when it exists, else extract and save here
    progress: bool | None = None  # None: a bar when stderr is a terminal


def _unique_names(tm: TemplateMedia) -> tuple[list[str], np.ndarray]:
    """The distinct images in first-seen order, and each tid/mid line's row among them."""
    row_of: dict[str, int] = {}
    rows = np.fromiter((row_of.setdefault(n, len(row_of)) for n in tm.names), np.int64, count=len(tm.names))
    return list(row_of), rows


def _check_pairs(release: IJBRelease, known: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> None:
    for column in (t1, t2):
        missing = ~np.isin(column, known)
        if missing.any():
            line = int(np.argmax(missing))
            raise data_error(release.pairs, f"line {line + 1}", f"names template {int(column[line])}, which "
                             f"{release.tid_mid.name} does not list", "Use the pair file of the same release as "
                             "the tid/mid file")


def _one_n_templates(release: IJBRelease, path: Path, known: np.ndarray, role: str) -> tuple[np.ndarray, np.ndarray]:
    ids, subjects = read_1n_templates(path)
    missing = ~np.isin(ids, known)
    if missing.any():
        what = "probe" if role == "probe" else "gallery template"
        raise data_error(path, "", f"{what} {int(ids[np.argmax(missing)])} has no images in {release.tid_mid.name}"
                         f" ({int(missing.sum())} such)", "Use the 1:N files of the same release as the tid/mid file")
    return ids, subjects


def _features(embedder: Embedder, release: IJBRelease, names: list[str], landmarks: Any,
              options: IJBOptions) -> ImageFeatures:
    model = model_fingerprint(embedder)
    if options.features is not None and options.features.exists():
        return load_features(options.features, names, model, options.flip)
    feats = extract_features(embedder, release.images, names, landmarks, flip=options.flip,
                             batch_size=options.batch_size, threads=options.threads, progress=options.progress)
    if options.features is not None:
        save_features(options.features, feats, model)
    return feats


def evaluate_ijb(embedder: Embedder, root: str | Path, target: str | None = None,
                 options: IJBOptions = IJBOptions()) -> list[dict[str, Any]]:
    """The JSON records of one release: the 1:1 record, then the 1:N record when the release has 1:N files."""
    release = find_release(root, target)
    tm = read_template_media(release.tid_mid)
    landmarks = read_five_points(release.landmarks)
    t1, t2, labels = read_template_pairs(release.pairs)
    known = np.unique(tm.templates)
    _check_pairs(release, known, t1, t2)
    one_n = None
    if release.gallery is not None and release.probes is not None:
        one_n = [_one_n_templates(release, p, known, role)
                 for p, role in ((release.gallery[0], "gallery"), (release.gallery[1], "gallery"),
                                 (release.probes, "probe"))]
    names, rows = _unique_names(tm)
    started = time.perf_counter()
    feats = _features(embedder, release, names, landmarks, options)
    extract_s = time.perf_counter() - started
    detector = landmarks.scores[[landmarks.row_of[n] for n in names]]
    image = scoring.image_features(feats.emb, feats.emb_flip if options.flip else None, detector,
                                   norm_weight=options.norm_weight, detector_weight=options.detector_weight)
    del feats  # unmaps a loaded features file: its pages (2 GB at IJB-C) leave this process's RSS
    if not np.array_equal(rows, np.arange(len(rows))):  # an image in several templates: one row per line
        image = image[rows]
    ids, templates = scoring.template_features(image, tm.templates, tm.media)
    del image
    scores = scoring.pair_scores(ids, templates, t1, t2)
    nearest, strict = scoring.tar_at_far(scores, labels)
    records: list[dict[str, Any]] = [{
        "set": release.target, "protocol": "1:1", "templates": len(ids), "pairs": len(t1),
        "genuine": int(labels.sum()), "tar_at_far": scoring.tar_keys(nearest),
        "tar_at_far_strict": scoring.tar_keys(strict), "images": len(names), "extract_s": round(extract_s, 3),
    }]
    if one_n is not None:
        row = {int(t): k for k, t in enumerate(ids)}

        def side(entry: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            return templates[[row[int(t)] for t in entry[0]]], entry[1]

        r = scoring.open_set_identification(side(one_n[0]), side(one_n[1]), side(one_n[2]))
        records.append({"set": release.target, "protocol": "1:N", "probes": r["probes"], "gallery": r["gallery"],
                        "rank1": r["rank1"], "rank5": r["rank5"], "rank10": r["rank10"],
                        "tpir_at_fpir": {str(float(k)): v for k, v in r["tpir_at_fpir"].items()}})
    return records


__all__ = ["IJBOptions", "evaluate_ijb"]
