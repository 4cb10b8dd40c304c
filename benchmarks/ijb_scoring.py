"""Scoring an IJB-C-sized protocol from saved features: ``fr_eval MODEL --ijb DIR --features FILE`` (issue 24).

Writes (once, cached under ``--cache``) a synthetic release of IJB-C's size in insightface's formats —
469,375 images in 23,124 templates (multi-frame media and stills), 15,658,489 template pairs
(19,557 genuine, as IJB-C), five-point lines for every image, G1/G2 galleries of 1,772 + 1,759
templates and 19,593 probes — and a features file of random 512-d embeddings (and mirrors) for its
images, as ``--features`` saves them. Then, each in a fresh process (peak RSS is the process's):

* ``fr_eval``: the whole re-scoring path of ``evaluate_ijb`` (read and check every meta file, load the
  features, weight, aggregate templates, score every pair, both TAR rules, 1:N) — what a user waits for;
* ``phases``: the same steps one by one, timed;
* ``baseline``: the loop formulation of insightface's ``eval_ijbc.py`` (one ``np.where`` over all images per
  template and per media, pairs gathered in 100k batches, ``np.loadtxt`` of the meta files as strings),
  on the same files and features.

    python benchmarks/ijb_scoring.py            # IJB-C size (~1.3 GB of cache, ~3 min the first time)

Prints a table and, last, one JSON line with the numbers. Target (issue 24): fr_eval ≤ 60 s, ≤ 4 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IJBC = {"images": 469_375, "templates": 23_124, "pairs": 15_658_489, "genuine": 19_557, "g1": 1_772, "g2": 1_759}


def _write_lines(path: Path, columns: list[np.ndarray], chunk: int = 1 << 20) -> None:
    with open(path, "w") as f:
        for lo in range(0, len(columns[0]), chunk):
            parts = [c[lo:lo + chunk] for c in columns]
            f.write("".join(" ".join(map(str, row)) + "\n" for row in zip(*(p.tolist() for p in parts), strict=True)))


def write_release(root: Path, dim: int, seed: int = 0) -> Path:
    """The cached IJB-C-sized release and its features file (see the module docstring)."""
    stamp = root / "complete"
    if stamp.is_file() and stamp.read_text() == json.dumps({**IJBC, "dim": dim, "seed": seed}):
        return root
    sys.path.insert(0, str(ROOT))
    from fr_train.evaluation.ijb_features import ImageFeatures, save_features

    rng = np.random.default_rng(seed)
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    n, t = IJBC["images"], IJBC["templates"]
    templates = np.sort(rng.integers(0, t, n))
    templates[:t] = np.arange(t)  # every template has an image
    templates = np.sort(templates) + 1
    media = templates * 10 + rng.integers(0, 3, n)  # a few media per template
    names = np.array([f"{i}.jpg" for i in range(1, n + 1)])
    _write_lines(meta / "ijbc_face_tid_mid.txt", [names, templates, media])
    subjects = np.empty(t + 1, np.int64)
    gallery_count = IJBC["g1"] + IJBC["g2"]
    subjects[1:gallery_count + 1] = np.arange(gallery_count)
    subjects[gallery_count + 1:] = rng.integers(0, gallery_count, t - gallery_count)
    genuine = []
    while len(genuine) < IJBC["genuine"]:
        a = rng.integers(1, t + 1, 4 * IJBC["genuine"])
        b = rng.integers(1, t + 1, a.size)
        keep = (subjects[a] == subjects[b]) & (a != b)
        genuine.extend(zip(a[keep].tolist(), b[keep].tolist(), strict=True))
    genuine = np.array(genuine[:IJBC["genuine"]])
    impostors = IJBC["pairs"] - len(genuine)
    t1 = np.concatenate([genuine[:, 0], rng.integers(1, t + 1, impostors)])
    t2 = np.concatenate([genuine[:, 1], rng.integers(1, t + 1, impostors)])
    label = (subjects[t1] == subjects[t2]).astype(np.int64)
    label[:len(genuine)] = 1
    _write_lines(meta / "ijbc_template_pair_label.txt", [t1, t2, label])
    points = np.round(rng.normal(56, 20, (n, 10)), 2)
    _write_lines(meta / "ijbc_name_5pts_score.txt",
                 [names, *points.T, np.round(rng.uniform(0.5, 1.0, n), 4)])
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
    files = {"ijbc_1N_gallery_G1.csv": range(1, IJBC["g1"] + 1),
             "ijbc_1N_gallery_G2.csv": range(IJBC["g1"] + 1, gallery_count + 1),
             "ijbc_1N_probe_mixed.csv": range(gallery_count + 1, t + 1)}
    for name, ids in files.items():
        (meta / name).write_text(header + "".join(f"{i},{subjects[i]},{i}.jpg,{i}\n" for i in ids))
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    flip = emb + 0.1 * rng.standard_normal((n, dim), dtype=np.float32)
    save_features(root / "ijbc.features", ImageFeatures(names=names.tolist(), emb=emb, emb_flip=flip),
                  model="unknown:benchmark")
    stamp.write_text(json.dumps({**IJBC, "dim": dim, "seed": seed}))
    return root


class _Saved:
    """The model whose features the file holds: never called (the features are given)."""

    image_size, name, source = 112, "benchmark", None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("features are given; nothing is embedded")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_fr_eval(root: Path) -> dict[str, Any]:
    from fr_train.evaluation.ijb import IJBOptions, evaluate_ijb

    t0 = time.perf_counter()
    records = evaluate_ijb(_Saved(), root, options=IJBOptions(features=root / "ijbc.features", progress=False))
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(), "tar_1e-4": records[0]["tar_at_far"]["0.0001"],
            "rank1": records[1]["rank1"]}


def child_phases(root: Path) -> dict[str, Any]:
    from data_pipeline.five_points import read_five_points
    from fr_train.evaluation import ijb_scoring as scoring
    from fr_train.evaluation.ijb_features import load_features
    from fr_train.evaluation.ijb_layout import find_release, read_template_media, read_template_pairs

    phases: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = round(now - t, 3)
        t = now

    release = find_release(root)
    tm = read_template_media(release.tid_mid)
    lap("read tid/mid")
    landmarks = read_five_points(release.landmarks)
    lap("read landmarks")
    t1, t2, labels = read_template_pairs(release.pairs)
    lap("read pairs")
    feats = load_features(root / "ijbc.features", tm.names, "unknown:benchmark", True)
    lap("load features")
    image = scoring.image_features(feats.emb, feats.emb_flip, landmarks.scores)
    lap("weight images")
    ids, templates = scoring.template_features(image, tm.templates, tm.media)
    lap("aggregate templates")
    scores = scoring.pair_scores(ids, templates, t1, t2)
    lap("score pairs")
    scoring.tar_at_far(scores, labels)
    lap("TAR@FAR")
    return {"phases": phases, "peak_mb": _peak_mb()}


def child_baseline(root: Path) -> dict[str, Any]:
    """insightface eval_ijbc.py's formulation (written here from its description, numpy only)."""
    from data_pipeline.array_file import read_array_file

    t0 = time.perf_counter()
    meta = root / "meta"
    tid_mid = np.loadtxt(meta / "ijbc_face_tid_mid.txt", dtype=str)
    templates, medias = tid_mid[:, 1].astype(int), tid_mid[:, 2].astype(int)
    pairs = np.loadtxt(meta / "ijbc_template_pair_label.txt", dtype=str).astype(int)
    scores_5pt = np.loadtxt(meta / "ijbc_name_5pts_score.txt", dtype=str)[:, -1].astype(np.float32)
    _, arrays = read_array_file(root / "ijbc.features")
    feats = (np.asarray(arrays["emb"]) + np.asarray(arrays["emb_flip"])) * scores_5pt[:, None]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), feats.shape[1]), np.float32)
    for k, uqt in enumerate(unique_templates):  # one scan of all images per template, one per media
        ind_t = np.where(templates == uqt)[0]
        face_norm_feats, face_medias = feats[ind_t], medias[ind_t]
        media_feats = [face_norm_feats[face_medias == m].mean(axis=0) for m in np.unique(face_medias)]
        template_feats[k] = np.sum(media_feats, axis=0)
    template_feats /= np.linalg.norm(template_feats, axis=1, keepdims=True)
    index = np.zeros(unique_templates.max() + 1, np.int64)
    index[unique_templates] = np.arange(len(unique_templates))
    score = np.zeros(len(pairs), np.float32)
    for lo in range(0, len(pairs), 100_000):
        a = template_feats[index[pairs[lo:lo + 100_000, 0]]]
        b = template_feats[index[pairs[lo:lo + 100_000, 1]]]
        score[lo:lo + 100_000] = np.sum(a * b, axis=1)
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb()}


def run_child(kind: str, root: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(root)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fr_train_ijb_scoring"))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON record here")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        fn = {"fr_eval": child_fr_eval, "phases": child_phases, "baseline": child_baseline}[args.child[0]]
        print(json.dumps(fn(Path(args.child[1]))))
        return
    t0 = time.perf_counter()
    root = write_release(args.cache, args.dim)
    prepared = time.perf_counter() - t0
    fr_eval = run_child("fr_eval", root)
    phases = run_child("phases", root)
    baseline = None if args.skip_baseline else run_child("baseline", root)
    print(f"IJB-C-sized protocol: {IJBC['images']:,} images, {IJBC['templates']:,} templates, "
          f"{IJBC['pairs']:,} pairs, {args.dim}-d features (release ready in {prepared:.0f} s)")
    print(f"{'run':28s} {'seconds':>8s} {'peak MB':>8s}")
    print(f"{'fr_eval --features':28s} {fr_eval['seconds']:8.1f} {fr_eval['peak_mb']:8.0f}")
    if baseline:
        print(f"{'baseline (eval_ijbc loops)':28s} {baseline['seconds']:8.1f} {baseline['peak_mb']:8.0f}")
    for name, s in phases["phases"].items():
        print(f"  {name:26s} {s:8.2f}")
    record = {"benchmark": "ijb_scoring", "date": datetime.date.today().isoformat(), "machine": platform.node(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__, **IJBC,
              "dim": args.dim, "fr_eval": fr_eval, "phases": phases, "baseline": baseline}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
