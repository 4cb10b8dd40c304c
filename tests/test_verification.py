"""Specification of the LFW-style 10-fold verification protocol and IJB-style TAR@FAR.

The reference implementations below are deliberately naive (a Python loop over every fold and
threshold, counting with ``np.less`` like insightface's ``calculate_accuracy``)."""

from __future__ import annotations

import numpy as np
import pytest

from fr_train.evaluation.verification import (
    DEFAULT_THRESHOLDS,
    combine_flip,
    evaluate_distances,
    evaluate_embeddings,
    fold_accuracy,
    fold_val_at_far,
    kfold_splits,
    pair_distances,
    roc_curve,
    tar_at_far,
)


def _ref_accuracy(threshold: float, dist: np.ndarray, same: np.ndarray) -> tuple[float, float, float]:
    predict = np.less(dist, threshold)
    tp = np.sum(predict & same)
    fp = np.sum(predict & ~same)
    tn = np.sum(~predict & ~same)
    fn = np.sum(~predict & same)
    tpr = 0.0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0.0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / dist.size


def _ref_folds(n: int, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for test in np.array_split(np.arange(n), k):  # same fold sizes as sklearn KFold(k, shuffle=False)
        out.append((np.setdiff1d(np.arange(n), test), test))
    return out


def _ref_protocol(dist: np.ndarray, same: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    accs, best = [], []
    for train, test in _ref_folds(dist.size, k):
        train_acc = [_ref_accuracy(t, dist[train], same[train])[2] for t in DEFAULT_THRESHOLDS]
        b = int(np.argmax(train_acc))
        accs.append(_ref_accuracy(DEFAULT_THRESHOLDS[b], dist[test], same[test])[2])
        best.append(DEFAULT_THRESHOLDS[b])
    return np.array(accs), np.array(best)


def _ref_val(dist: np.ndarray, same: np.ndarray, target: float, k: int = 10) -> np.ndarray:
    vals = []
    for train, test in _ref_folds(dist.size, k):
        d_tr, s_tr = dist[train], same[train]
        far = np.array([np.sum((d_tr < t) & ~s_tr) / np.sum(~s_tr) for t in DEFAULT_THRESHOLDS])
        thr = DEFAULT_THRESHOLDS[-1]
        for i in range(len(far) - 1):
            if far[i] <= target < far[i + 1]:
                thr = DEFAULT_THRESHOLDS[i] + (target - far[i]) / (far[i + 1] - far[i]) * (
                    DEFAULT_THRESHOLDS[i + 1] - DEFAULT_THRESHOLDS[i])
                break
        acc = dist[test] < thr
        vals.append(np.sum(acc & same[test]) / np.sum(same[test]))
    return np.array(vals)


def _ref_tar_at_far(scores: np.ndarray, same: np.ndarray, target: float) -> float:
    best = 0.0
    for t in np.unique(scores):
        accept = scores >= t
        far = np.sum(accept & ~same) / np.sum(~same)
        if far <= target:
            best = max(best, np.sum(accept & same) / np.sum(same))
    return best


def _noisy_pairs(rng: np.random.Generator, n_pairs: int, dim: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings; genuine pairs are a vector and a noisy copy, impostors independent."""
    same = rng.random(n_pairs) < 0.5
    a = rng.standard_normal((n_pairs, dim))
    b = np.where(same[:, None], a + noise * rng.standard_normal((n_pairs, dim)), rng.standard_normal((n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), same


@pytest.mark.parametrize("n", [10, 23, 600, 6001])
def test_folds_are_contiguous_like_sklearn_kfold(n: int) -> None:
    for (train, test), (ref_train, ref_test) in zip(kfold_splits(n, 10), _ref_folds(n, 10), strict=True):
        np.testing.assert_array_equal(test, ref_test)
        np.testing.assert_array_equal(train, ref_train)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fold_accuracy_and_threshold_match_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb, same = _noisy_pairs(rng, 437, 16, noise=1.2)
    dist = pair_distances(emb)
    accs, best = fold_accuracy(dist, same)
    ref_accs, ref_best = _ref_protocol(dist, same)
    np.testing.assert_array_equal(best, ref_best)
    np.testing.assert_allclose(accs, ref_accs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_val_at_far_matches_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb, same = _noisy_pairs(rng, 3000, 8, noise=0.9)
    dist = pair_distances(emb)
    for target in (1e-3, 1e-2):
        vals, fars = fold_val_at_far(dist, same, target)
        np.testing.assert_allclose(vals, _ref_val(dist, same, target), atol=1e-12)
        assert np.all(fars <= 0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    same = rng.random(700) < 0.4
    scores = np.round(rng.standard_normal(700) + 1.5 * same, 1)  # rounding creates many ties
    got = tar_at_far(scores, same, fars=(0.0, 1e-3, 1e-2, 0.1, 0.5))
    for target, tar in got.items():
        assert tar == pytest.approx(_ref_tar_at_far(scores, same, target), abs=1e-12)


def test_tar_at_far_exact_small_case() -> None:
    scores = np.array([0.9, 0.85, 0.8, 0.3, 0.2, 0.1, 0.05])
    same = np.array([True, False, True, True, False, False, False])
    got = tar_at_far(scores, same, fars=(0.0, 0.25, 0.5))
    assert got == {0.0: pytest.approx(1 / 3), 0.25: pytest.approx(1.0), 0.5: pytest.approx(1.0)}
    far, tar, thr = roc_curve(scores, same)
    assert far[0] == 0 and tar[0] == 0 and thr[0] == np.inf
    assert far[-1] == 1 and tar[-1] == 1


def test_tied_genuine_and_impostor_scores_cannot_be_split() -> None:
    """A threshold accepts all tied scores at once, so a tie never yields TAR without FAR."""
    scores = np.array([0.5, 0.5, 0.1])
    same = np.array([True, False, False])
    assert tar_at_far(scores, same, fars=(0.0, 0.5)) == {0.0: 0.0, 0.5: 1.0}


def test_perfect_separation_scores_one_everywhere() -> None:
    same = np.tile([True, False], 50)
    dist = np.where(same, 0.5, 1.5)
    res = evaluate_distances(dist, same)
    assert res.accuracy == 1.0 and res.accuracy_std == 0.0
    assert res.threshold == pytest.approx(0.51)  # first threshold (argmax) with d < t for all genuine pairs
    assert res.val_at_far_1e3 == 1.0
    assert res.tar_at_far == {1e-4: 1.0, 1e-3: 1.0}


def test_exact_small_case_with_one_unavoidable_error_per_fold() -> None:
    """Per fold of 4 pairs: genuine at d=0.2, 0.2, 1.0; impostor at d=0.8 → best t = 0.21, acc 3/4."""
    same = np.tile([True, True, True, False], 10)
    dist = np.tile([0.2, 0.2, 1.0, 0.8], 10)
    accs, best = fold_accuracy(dist, same)
    np.testing.assert_allclose(accs, 0.75)
    np.testing.assert_allclose(best, 0.21)


def test_random_embeddings_score_chance() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((8000, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    same = rng.random(4000) < 0.5
    res = evaluate_embeddings(emb, same)
    assert 0.45 < res.accuracy < 0.56
    assert res.tar_at_far[1e-3] < 0.02


def test_combine_flip_sums_then_normalises() -> None:
    rng = np.random.default_rng(0)
    e, f = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    got = combine_flip(e, f)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0)
    np.testing.assert_allclose(got, (e + f) / np.linalg.norm(e + f, axis=1, keepdims=True))


def test_squared_distance_equals_two_minus_two_cosine() -> None:
    rng = np.random.default_rng(0)
    emb, _ = _noisy_pairs(rng, 50, 8, noise=0.5)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    np.testing.assert_allclose(pair_distances(emb), 2 - 2 * cos, atol=1e-12)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="issame must be bool"):
        evaluate_distances(np.zeros(20), np.zeros(20, dtype=int))
    with pytest.raises(ValueError, match="20 distances for 19"):
        evaluate_distances(np.zeros(20), np.zeros(19, dtype=bool))
    with pytest.raises(ValueError, match="L2-normalised"):
        evaluate_embeddings(np.ones((20, 3)), np.zeros(10, dtype=bool))
    with pytest.raises(ValueError, match="n_folds"):
        kfold_splits(5, 10)
    with pytest.raises(ValueError, match="both classes"):
        tar_at_far(np.zeros(4), np.zeros(4, dtype=bool))


@pytest.mark.parametrize(("same", "message"), [
    (np.array([], dtype=bool), r"0 pair\(s\): the 10-fold protocol needs at least 10 pairs"),
    (np.array([True, False, True]), r"3 pair\(s\): the 10-fold protocol needs at least 10 pairs"),
    (np.ones(20, dtype=bool), r"all 20 pairs are genuine .*need both genuine and impostor"),
    (np.zeros(20, dtype=bool), r"all 20 pairs are impostor"),
])
def test_sets_the_protocol_cannot_score_are_refused_saying_why(same: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_distances(np.zeros(same.size), same)
