"""1:1 verification metrics: the LFW 10-fold protocol as insightface evaluates it, and TAR@FAR.

Protocol (insightface ``recognition/arcface_torch/eval/verification.py``): each image is embedded
together with its horizontal flip, the two embeddings are summed and L2-normalised
(:func:`combine_flip`); a pair's score is the squared L2 distance ``d = ||e1 - e2||² = 2 - 2·cos``;
a pair is predicted "same" when ``d < t``. With thresholds ``t ∈ {0, 0.01, ..., 3.99}`` and 10
contiguous folds (sklearn ``KFold(10, shuffle=False)``), the threshold with the best accuracy on
9 folds (first one on ties) is scored on the held-out fold. VAL@FAR picks, per fold, the threshold
at which the training folds' FAR crosses the target (linear interpolation) and reports the
held-out VAL. Everything is numpy; counts use sorted distances + ``searchsorted`` (exactly
``np.less(d, t)`` counted, O(n log n) instead of O(n·thresholds)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_THRESHOLDS = np.arange(0.0, 4.0, 0.01)  # insightface: np.arange(0, 4, 0.01), 400 values
DEFAULT_FOLDS = 10


@dataclass(frozen=True)
class VerificationResult:
    """Mean ± std (over folds) best-threshold accuracy, the mean chosen threshold (squared L2
    distance), VAL at FAR=1e-3 (insightface), and TAR at FAR targets from the whole-set ROC."""

    accuracy: float
    accuracy_std: float
    threshold: float
    val_at_far_1e3: float
    tar_at_far: dict[float, float] = field(default_factory=dict)

    def summary(self) -> str:
        tars = ", ".join(f"TAR@FAR={far:g}: {tar:.4f}" for far, tar in sorted(self.tar_at_far.items()))
        return (f"accuracy {self.accuracy:.4f} ± {self.accuracy_std:.4f} (threshold {self.threshold:.3f}), "
                f"VAL@FAR=1e-3: {self.val_at_far_1e3:.4f}" + (f", {tars}" if tars else ""))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64). A zero row is an error: it has no direction."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        bad = np.flatnonzero((norms == 0) | ~np.isfinite(norms))
        raise ValueError(f"l2_normalize: rows {bad[:10].tolist()} have zero or non-finite norm")
    return x / norms


def combine_flip(emb: np.ndarray, emb_flipped: np.ndarray) -> np.ndarray:
    """insightface's test-time augmentation: ``normalize(f(x) + f(flip(x)))`` per row."""
    emb = np.asarray(emb, dtype=np.float64)
    emb_flipped = np.asarray(emb_flipped, dtype=np.float64)
    if emb.shape != emb_flipped.shape:
        raise ValueError(f"combine_flip: shapes differ, {emb.shape} vs {emb_flipped.shape}")
    return l2_normalize(emb + emb_flipped)


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of consecutive rows (pair i = rows 2i, 2i+1) → shape (N,)."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] % 2:
        raise ValueError(f"pair_distances: expected (2N, D) embeddings, got shape {e.shape}")
    diff = e[0::2] - e[1::2]
    return np.einsum("nd,nd->n", diff, diff)


def kfold_splits(n: int, n_folds: int = DEFAULT_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of contiguous folds, as ``sklearn.model_selection.KFold(n_folds)``:
    the first ``n % n_folds`` folds hold one extra item."""
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"kfold_splits: need 2 <= n_folds <= n, got n_folds={n_folds}, n={n}")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    idx = np.arange(n)
    return [(np.concatenate([idx[: bounds[k]], idx[bounds[k + 1]:]]), idx[bounds[k]: bounds[k + 1]])
            for k in range(n_folds)]


def _counts_below(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each threshold t: (#same pairs with d < t, #different pairs with d < t, n_same, n_diff)."""
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    tp = np.searchsorted(pos, thresholds, side="left")  # side="left" counts elements strictly below t
    fp = np.searchsorted(neg, thresholds, side="left")
    return tp, fp, pos.size, neg.size


def _accuracy_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    tp, fp, _, n_neg = _counts_below(dist, issame, thresholds)
    return (tp + (n_neg - fp)) / dist.size  # (TP + TN) / n


def _validate(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.asarray(dist, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame).reshape(-1)
    if issame.dtype != np.bool_:
        raise ValueError(f"issame must be bool, got dtype {issame.dtype}")
    if dist.shape != issame.shape:
        raise ValueError(f"{dist.size} distances for {issame.size} issame labels")
    if not np.all(np.isfinite(dist)):
        raise ValueError(f"distances contain {np.count_nonzero(~np.isfinite(dist))} non-finite values")
    return dist, issame


def check_pairs(issame: np.ndarray, n_folds: int = DEFAULT_FOLDS) -> None:
    """Refuse label sets the protocol cannot score, saying why. WHY here and not deep inside: the
    k-fold split and the ROC otherwise fail with an index-level message ("need 2 <= n_folds <= n"),
    or an all-genuine set scores a meaningless 100% accuracy while its TAR@FAR raises."""
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    n, n_same = issame.size, int(issame.sum())
    if n < n_folds:
        raise ValueError(f"{n} pair(s): the {n_folds}-fold protocol needs at least {n_folds} pairs, genuine "
                         "(same identity) and impostor")
    if n_same in (0, n):
        kind = "genuine (same identity)" if n_same == n else "impostor (different identities)"
        raise ValueError(f"all {n} pairs are {kind}: accuracy and TAR@FAR need both genuine and impostor pairs")


def fold_accuracy(dist: np.ndarray, issame: np.ndarray, *, thresholds: np.ndarray = DEFAULT_THRESHOLDS,
                  n_folds: int = DEFAULT_FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per fold: held-out accuracy at the threshold best on the other folds, and that threshold."""
    dist, issame = _validate(dist, issame)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    accs, best = [], []
    for train, test in kfold_splits(dist.size, n_folds):
        k = int(np.argmax(_accuracy_curve(dist[train], issame[train], thresholds)))  # first max, as np.argmax
        accs.append(_accuracy_curve(dist[test], issame[test], thresholds[k: k + 1])[0])
        best.append(thresholds[k])
    return np.asarray(accs), np.asarray(best)


def _threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold where the (non-decreasing) FAR curve crosses ``far_target``, linearly interpolated
    between the last threshold with FAR <= target and the next one (insightface interpolates the
    inverse curve with scipy ``interp1d(kind='slinear')``, which is ill-defined on repeated FAR
    values; this is the same line segment, made unambiguous)."""
    below = np.flatnonzero(far <= far_target)
    if below.size == 0:
        return float(thresholds[0])
    i = int(below[-1])
    if i == far.size - 1:  # FAR never exceeds the target: accept as much as the grid allows
        return float(thresholds[-1])
    f0, f1 = far[i], far[i + 1]
    return float(thresholds[i] + (far_target - f0) / (f1 - f0) * (thresholds[i + 1] - thresholds[i]))


def fold_val_at_far(dist: np.ndarray, issame: np.ndarray, far_target: float = 1e-3, *,
                    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
                    n_folds: int = DEFAULT_FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per fold: (VAL, FAR) on the held-out fold at the threshold where the training folds' FAR
    reaches ``far_target``. VAL = TA/n_same, FAR = FA/n_diff; NaN where a fold lacks that class."""
    dist, issame = _validate(dist, issame)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    vals, fars = [], []
    for train, test in kfold_splits(dist.size, n_folds):
        _, fp, _, n_neg = _counts_below(dist[train], issame[train], thresholds)
        far_train = fp / n_neg if n_neg else np.zeros(thresholds.size)
        t = _threshold_at_far(far_train, thresholds, far_target)
        accept = dist[test] < t
        same = issame[test]
        n_same, n_diff = int(same.sum()), int((~same).sum())
        vals.append(np.count_nonzero(accept & same) / n_same if n_same else np.nan)
        fars.append(np.count_nonzero(accept & ~same) / n_diff if n_diff else np.nan)
    return np.asarray(vals), np.asarray(fars)


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of "accept when score >= threshold" (higher score = more similar) at every distinct
    score, plus the empty operating point at +inf. Returns (far, tar, thresholds), FAR ascending."""
    scores, issame = _validate(scores, issame)
    n_pos, n_neg = int(issame.sum()), int((~issame).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_curve needs both classes, got {n_pos} genuine and {n_neg} impostor pairs")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a threshold accepts a whole group of tied scores
    far = np.r_[0.0, fp[last_of_tie] / n_neg]
    tar = np.r_[0.0, tp[last_of_tie] / n_pos]
    return far, tar, np.r_[np.inf, s[last_of_tie]]


def tar_at_far(scores: np.ndarray, issame: np.ndarray,
               fars: Sequence[float] = (1e-4, 1e-3)) -> dict[float, float]:
    """IJB-style TAR at each FAR target: the best TAR of any ROC operating point whose FAR does
    not exceed the target, i.e. TAR at the loosest score threshold with FAR <= target."""
    far, tar, _ = roc_curve(scores, issame)
    return {float(f): float(tar[far <= f].max()) for f in fars}


def evaluate_distances(dist: np.ndarray, issame: np.ndarray, *, n_folds: int = DEFAULT_FOLDS,
                       thresholds: np.ndarray = DEFAULT_THRESHOLDS,
                       tar_fars: Sequence[float] = (1e-4, 1e-3)) -> VerificationResult:
    """All metrics from squared L2 pair distances (smaller = more similar)."""
    dist, issame = _validate(dist, issame)
    check_pairs(issame, n_folds)
    accs, best = fold_accuracy(dist, issame, thresholds=thresholds, n_folds=n_folds)
    vals, _ = fold_val_at_far(dist, issame, 1e-3, thresholds=thresholds, n_folds=n_folds)
    return VerificationResult(
        accuracy=float(accs.mean()),
        accuracy_std=float(accs.std()),  # population std over folds, as insightface reports
        threshold=float(best.mean()),
        val_at_far_1e3=float(vals.mean()),
        tar_at_far=tar_at_far(-dist, issame, tar_fars),  # -d ranks pairs exactly like cosine for unit vectors
    )


def evaluate_embeddings(embeddings: np.ndarray, issame: np.ndarray, **kwargs: object) -> VerificationResult:
    """Metrics for (2N, D) embeddings that are already flip-combined and L2-normalised."""
    e = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1)
    if e.ndim != 2 or not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("evaluate_embeddings expects L2-normalised (2N, D) rows; apply combine_flip or "
                         "l2_normalize first")
    return evaluate_distances(pair_distances(e), issame, **kwargs)  # type: ignore[arg-type]
