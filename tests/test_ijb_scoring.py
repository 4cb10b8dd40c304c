"""Specification of the IJB-B/IJB-C scoring math (fr_train.evaluation.ijb_scoring).

Every function is checked against a reference written here to be obviously correct rather than fast:
Python loops over images, templates, pairs, thresholds and probes, in float64, on small random data with
several seeds and deliberate ties. Where ties must be exact, features are sign vectors with entries
±1/4 in 16 dimensions: unit norm exactly, and every dot product is a multiple of 1/16, so float32 BLAS
and the float64 loops agree bit for bit whatever the summation order.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from fr_train.evaluation import ijb_scoring
from fr_train.evaluation.ijb_scoring import (
    FAR_TARGETS,
    FPIR_TARGETS,
    RANKS,
    UnknownTemplateError,
    identification,
    image_features,
    open_set_identification,
    pair_scores,
    tar_at_far,
    tar_keys,
    template_features,
)

SEEDS = (0, 1, 2, 3)


# ----------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------

def ref_image_features(emb, emb_flip, scores, norm_weight, detector_weight) -> np.ndarray:
    rows = []
    for i in range(emb.shape[0]):
        f = np.array(emb[i], dtype=np.float64)
        if emb_flip is not None:
            f = f + np.array(emb_flip[i], dtype=np.float64)
        if not norm_weight:
            f = f / np.sqrt(sum(v * v for v in f))
        if detector_weight:
            f = f * float(scores[i])
        rows.append(f)
    return np.array(rows)


def ref_template_features(features, templates, media) -> tuple[np.ndarray, np.ndarray]:
    groups: dict[int, dict[int, list[np.ndarray]]] = {}
    for i in range(features.shape[0]):
        groups.setdefault(int(templates[i]), {}).setdefault(int(media[i]), []).append(
            np.array(features[i], dtype=np.float64))
    ids = sorted(groups)
    out = []
    for t in ids:
        total = np.zeros(features.shape[1])
        for images in groups[t].values():
            total = total + sum(images) / len(images)
        out.append(total / np.sqrt(total @ total))
    return np.array(ids), np.array(out)


def ref_pair_scores(template_ids, feats, t1, t2) -> np.ndarray:
    row = {int(t): k for k, t in enumerate(template_ids)}
    f = np.asarray(feats, dtype=np.float64)
    return np.array([f[row[int(a)]] @ f[row[int(b)]] for a, b in zip(t1, t2, strict=True)])


def ref_roc(scores, labels) -> list[tuple[float, float]]:
    """(FAR, TAR) at every distinct score plus (0, 0), accepting score >= threshold."""
    s = [float(v) for v in scores]
    y = [bool(v) for v in labels]
    n_pos, n_neg = sum(y), len(y) - sum(y)
    points = [(0.0, 0.0)]
    for th in sorted(set(s), reverse=True):
        tp = sum(1 for si, yi in zip(s, y, strict=True) if yi and si >= th)
        fp = sum(1 for si, yi in zip(s, y, strict=True) if not yi and si >= th)
        points.append((fp / n_neg, tp / n_pos))
    return points


def ref_tar_nearest(points, target: float) -> float:
    best_dist, best_tar = None, None
    for far, tar in points:
        dist = abs(far - target)
        if best_dist is None or dist < best_dist or (dist == best_dist and tar > best_tar):
            best_dist, best_tar = dist, tar
    return best_tar


def ref_tar_strict(points, target: float) -> float:
    return max(tar for far, tar in points if far <= target)


def ref_identification(g, g_subj, p, p_subj, ranks, fpirs) -> dict:
    g = np.asarray(g, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    gallery_subjects = {s.item() for s in g_subj}
    mated_ranks, mated_hits, non_mated_top1 = [], [], []
    for i in range(p.shape[0]):
        sims = [float(p[i] @ g[j]) for j in range(g.shape[0])]
        top1 = max(sims)
        if p_subj[i].item() in gallery_subjects:
            best_mate = max(sims[j] for j in range(len(sims)) if g_subj[j] == p_subj[i])
            rank = 1 + sum(1 for j in range(len(sims)) if g_subj[j] != p_subj[i] and sims[j] > best_mate)
            mated_ranks.append(rank)
            mated_hits.append((rank == 1, top1))
        else:
            non_mated_top1.append(top1)
    n_m, n_nm = len(mated_ranks), len(non_mated_top1)
    rank = {k: (sum(1 for r in mated_ranks if r <= k) / n_m if n_m else None) for k in ranks}
    tpir = {}
    desc = sorted(non_mated_top1, reverse=True)
    for fpir in fpirs:
        if not n_nm or not n_m:
            tpir[fpir] = None
            continue
        m = max(k for k in range(n_nm + 1) if Fraction(k, n_nm) <= Fraction(str(fpir)))
        tau = desc[m] if m < n_nm else -np.inf
        assert sum(1 for s in non_mated_top1 if s > tau) <= fpir * n_nm + 1e-9
        tpir[fpir] = sum(1 for hit, s in mated_hits if hit and s > tau) / n_m
    return {"mated": n_m, "non_mated": n_nm, "rank": rank, "tpir_at_fpir": tpir}


def sign_vectors(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    """Unit rows with entries ±1/sqrt(d) (d = 16: ±1/4), whose dot products are exact in float32."""
    return (rng.choice([-1.0, 1.0], size=(n, d)) / np.sqrt(d)).astype(np.float32)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# image_features
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_weight", [True, False])
@pytest.mark.parametrize("detector_weight", [True, False])
@pytest.mark.parametrize("flip", [True, False])
def test_image_features_match_the_per_row_recipe_for_every_flag(seed, norm_weight, detector_weight, flip):
    rng = np.random.default_rng(seed)
    emb = (rng.standard_normal((37, 8)) * rng.uniform(0.1, 30, (37, 1))).astype(np.float32)
    emb_flip = (emb + rng.standard_normal(emb.shape).astype(np.float32)) if flip else None
    det = rng.uniform(0, 1, 37)
    got = image_features(emb, emb_flip, det, norm_weight=norm_weight, detector_weight=detector_weight)
    assert got.dtype == np.float32 and got.shape == emb.shape
    want = ref_image_features(emb, emb_flip, det, norm_weight, detector_weight)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())


def test_image_features_keep_the_norm_so_a_sharper_face_weighs_more():
    emb = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)
    got = image_features(emb, emb, np.ones(2), norm_weight=True, detector_weight=False)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), [10.0, 1.0], rtol=1e-6)


def test_image_features_do_not_modify_their_inputs():
    rng = np.random.default_rng(0)
    emb, flip = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    emb0, flip0 = emb.copy(), flip.copy()
    image_features(emb, flip, np.full(5, 0.5), norm_weight=False)
    np.testing.assert_array_equal(emb, emb0)
    np.testing.assert_array_equal(flip, flip0)


def test_image_features_refuse_a_zero_row_only_when_they_must_normalise_it():
    emb = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]], dtype=np.float32)
    out = image_features(emb, None, np.ones(3), norm_weight=True)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])
    with pytest.raises(ValueError, match="row 1 is zero"):
        image_features(emb, None, np.ones(3), norm_weight=False)


def test_image_features_refuse_a_zero_flip_sum_naming_its_row():
    emb = np.array([[1.0, 2.0], [1.0, -1.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="row 1 is zero"):
        image_features(emb, np.array([[0.0, 0.0], [-1.0, 1.0]], dtype=np.float32), np.ones(2),
                       norm_weight=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_image_features_refuse_a_non_finite_row_naming_it(bad):
    emb = np.ones((4, 3), dtype=np.float32)
    emb[2, 1] = bad
    for norm_weight in (True, False):
        with pytest.raises(ValueError, match="row 2 is not finite"):
            image_features(emb, None, np.ones(4), norm_weight=norm_weight)


def test_image_features_refuse_a_negative_detector_score_and_ignore_scores_when_unused():
    emb = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="row 1"):
        image_features(emb, None, np.array([0.9, -0.1, 0.5]))
    out = image_features(emb, None, np.array([0.9, -0.1, 0.5]), detector_weight=False)
    np.testing.assert_array_equal(out, emb)


def test_image_features_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="emb_flip"):
        image_features(np.ones((3, 2), np.float32), np.ones((3, 4), np.float32), np.ones(3))
    with pytest.raises(ValueError, match="detector_scores"):
        image_features(np.ones((3, 2), np.float32), None, np.ones(4))


# ----------------------------------------------------------------------------------------------------
# template_features
# ----------------------------------------------------------------------------------------------------

def random_protocol(rng: np.random.Generator, n: int, n_templates: int, n_media: int):
    """Template/media ids in shuffled order, media ids reused across templates, gaps in the id range."""
    template_pool = np.sort(rng.choice(10 * n_templates, n_templates, replace=False)) + 100
    templates = rng.choice(template_pool, n)
    templates[:n_templates] = template_pool  # every template has at least one image
    media = rng.integers(0, n_media, n)
    perm = rng.permutation(n)
    return templates[perm].astype(np.int64), media[perm].astype(np.int64)


@pytest.mark.parametrize("seed", SEEDS)
def test_template_features_average_each_media_then_sum_and_normalise(seed):
    rng = np.random.default_rng(seed)
    templates, media = random_protocol(rng, 300, 20, 12)
    feats = (rng.standard_normal((300, 6)) * rng.uniform(0.5, 5, (300, 1))).astype(np.float32)
    ids, got = template_features(feats, templates, media)
    want_ids, want = ref_template_features(feats, templates, media)
    np.testing.assert_array_equal(ids, want_ids)
    assert ids.dtype == np.int64 and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_template_features_are_the_same_whatever_the_block_and_big_template_sizes(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    templates, media = random_protocol(rng, 200, 9, 5)
    templates[:60] = templates[0]  # one template much larger than the others
    feats = rng.standard_normal((200, 4)).astype(np.float32)
    want_ids, want = ref_template_features(feats, templates, media)
    for block, big in ((1, 1), (2, 5), (3, 1000), (7, 25), (1000, 0)):
        monkeypatch.setattr(ijb_scoring, "_TEMPLATE_BLOCK", block)
        monkeypatch.setattr(ijb_scoring, "_BIG_TEMPLATE", big)
        ids, got = template_features(feats, templates, media)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_template_features_group_a_media_id_shared_by_two_templates_separately():
    # media 5 appears in templates 1 and 2; in template 1 it has two frames, in template 2 one
    feats = np.array([[1, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    templates = np.array([1, 1, 1, 2])
    media = np.array([5, 5, 6, 5])
    ids, got = template_features(feats, templates, media)
    np.testing.assert_array_equal(ids, [1, 2])
    # template 1: mean(frames of media 5) = (1, 0), plus media 6 = (0, 1) -> (1, 1)/sqrt2
    np.testing.assert_allclose(got, [[2 ** -0.5, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


def test_template_features_weigh_a_video_once_however_many_frames_it_has():
    feats = np.array([[1, 0]] * 50 + [[0, 1]], dtype=np.float32)
    _, got = template_features(feats, np.zeros(51, np.int64), np.r_[np.zeros(50), 1].astype(np.int64))
    np.testing.assert_allclose(got, [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


def test_template_features_refuse_a_template_that_sums_to_zero_naming_it():
    feats = np.array([[0, 1], [1, 0], [-1, 0], [0, 1], [2, 0], [-2, 0]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"template 7 .*\(2 such templates\)"):
        template_features(feats, np.array([4, 7, 7, 9, 8, 8]), np.array([1, 2, 3, 4, 5, 6]))
    feats[0, 0] = np.nan
    with pytest.raises(ValueError, match="template 4 "):
        template_features(feats, np.array([4, 7, 7, 9, 8, 8]), np.array([1, 2, 3, 4, 5, 6]))


def test_template_features_refuse_float_ids_and_mismatched_lengths():
    feats = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="integer"):
        template_features(feats, np.array([1.0, 1.0, 2.0]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="media"):
        template_features(feats, np.array([1, 1, 2]), np.array([1, 2]))


# ----------------------------------------------------------------------------------------------------
# pair_scores
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_pair_scores_match_a_float64_dot_product_per_pair(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1000, 1000 + 3 * 40, 3))  # unsorted, gaps
    feats = unit_rows(rng, ids.size, 16)
    t1, t2 = rng.choice(ids, 500), rng.choice(ids, 500)
    want = ref_pair_scores(ids, feats, t1, t2)
    got = pair_scores(ids, feats, t1, t2)
    assert got.dtype == np.float32 and got.shape == (500,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    monkeypatch.setattr(ijb_scoring, "_SIM_BLOCK_FLOATS", 50)  # a few rows per block: many blocks
    for chunk in (1, 13, 1 << 17):
        np.testing.assert_allclose(pair_scores(ids, feats, t1, t2, chunk=chunk), want, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_pair_scores_are_exact_on_exact_features_when_pairs_use_few_templates(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    ids = np.arange(30) * 7
    feats = sign_vectors(rng, 30)
    t1 = rng.choice(ids[:5], 200)  # rows and columns of the product are small disjoint subsets
    t2 = rng.choice(ids[20:], 200)
    monkeypatch.setattr(ijb_scoring, "_SIM_BLOCK_FLOATS", 20)
    want = ref_pair_scores(ids, feats, t1, t2)
    np.testing.assert_array_equal(pair_scores(ids, feats, t1, t2, chunk=3), want)


def test_pair_scores_use_a_binary_search_when_template_ids_are_sparse():
    rng = np.random.default_rng(5)
    ids = np.array([3, 10 ** 12, 7 * 10 ** 11, -(10 ** 10)], dtype=np.int64)
    feats = sign_vectors(rng, 4)
    t1, t2 = rng.choice(ids, 50), rng.choice(ids, 50)
    np.testing.assert_array_equal(pair_scores(ids, feats, t1, t2), ref_pair_scores(ids, feats, t1, t2))
    with pytest.raises(UnknownTemplateError) as e:
        pair_scores(ids, feats, np.r_[t1, 4], np.r_[t2, 3])
    assert (e.value.pair_index, e.value.template_id) == (50, 4)


def test_pair_scores_raise_unknown_template_error_for_the_first_bad_pair():
    ids = np.array([10, 20, 30])
    feats = np.eye(3, dtype=np.float32)
    t1 = np.array([10, 20, 30, 99, 10])
    t2 = np.array([20, 30, 55, 10, 77])
    with pytest.raises(UnknownTemplateError) as e:
        pair_scores(ids, feats, t1, t2)
    assert isinstance(e.value, ValueError)
    assert (e.value.pair_index, e.value.template_id) == (2, 55)
    assert "pair 2" in str(e.value) and "55" in str(e.value)
    with pytest.raises(UnknownTemplateError) as e:  # both ids missing: the t1 one is named
        pair_scores(ids, feats, np.array([10, 5]), np.array([20, 6]))
    assert (e.value.pair_index, e.value.template_id) == (1, 5)
    with pytest.raises(UnknownTemplateError):  # below the smallest id
        pair_scores(ids, feats, np.array([-3]), np.array([10]))


def test_pair_scores_refuse_unnormalised_features_and_duplicate_ids():
    with pytest.raises(ValueError, match="L2-normalised"):
        pair_scores(np.array([1, 2]), np.array([[2.0, 0], [0, 1]], np.float32), np.array([1]), np.array([2]))
    with pytest.raises(ValueError, match="unique"):
        pair_scores(np.array([1, 1]), np.eye(2, dtype=np.float32), np.array([1]), np.array([1]))


def test_pair_scores_of_no_pairs_are_empty():
    assert pair_scores(np.array([1]), np.ones((1, 1), np.float32), np.array([], np.int64),
                       np.array([], np.int64)).shape == (0,)


# ----------------------------------------------------------------------------------------------------
# tar_at_far
# ----------------------------------------------------------------------------------------------------

def far_targets_for(points) -> list[float]:
    """The default targets, every ROC FAR exactly, the midpoints between neighbours (equal-distance ties)
    and a little either side of each, plus the ends."""
    fars = sorted({far for far, _ in points})
    mids = [(a + b) / 2 for a, b in itertools.pairwise(fars)]
    near = [f * (1 + e) for f in fars for e in (-1e-9, 1e-9)]
    return [*FAR_TARGETS, *fars, *mids, *near, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("levels", [3, 12, None])
def test_tar_at_far_matches_a_brute_force_roc(seed, levels):
    rng = np.random.default_rng(seed)
    n = 120
    labels = rng.random(n) < 0.3
    raw = rng.random(n) + 0.4 * labels
    scores = (np.round(raw * levels) / levels if levels else raw).astype(np.float32)  # coarse levels: ties
    points = ref_roc(scores, labels)
    targets = far_targets_for(points)
    nearest, strict = tar_at_far(scores, labels.astype(np.int64), targets)
    for t in targets:
        assert nearest[t] == ref_tar_nearest(points, t), t
        assert strict[t] == ref_tar_strict(points, t), t


def test_tar_nearest_rule_picks_the_larger_tar_on_a_far_tie():
    # 4 impostors: FAR steps of 0.25. Target 0.375 is exactly 0.125 from FAR 0.25 and FAR 0.5.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    nearest, strict = tar_at_far(scores, labels, [0.375])
    assert nearest[0.375] == 0.5  # the FAR-0.5 point (TAR 2/4), not the FAR-0.25 one (TAR 1/4)
    assert strict[0.375] == 0.25


def test_tar_nearest_rule_picks_the_top_of_a_vertical_roc_run():
    # after the first impostor, three genuines are accepted one by one: FAR 0.5 at TAR 0, 1/3, 2/3, 1
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1], dtype=np.float32)
    labels = np.array([0, 1, 1, 1, 0])
    nearest, strict = tar_at_far(scores, labels, [0.5, 0.45, 0.7])
    assert nearest == {0.5: 1.0, 0.45: 1.0, 0.7: 1.0}
    assert strict == {0.5: 1.0, 0.45: 0.0, 0.7: 1.0}


def test_tar_at_far_accepts_a_tied_group_as_a_whole():
    # the genuine and the impostor tied at 0.8 are accepted together: no ROC point has TAR 1/2 at FAR 0
    scores = np.array([0.9, 0.8, 0.8, 0.1], dtype=np.float32)
    labels = np.array([1, 1, 0, 0])
    nearest, strict = tar_at_far(scores, labels, [0.0, 0.2, 0.5])
    assert strict == {0.0: 0.5, 0.2: 0.5, 0.5: 1.0}
    assert nearest == {0.0: 0.5, 0.2: 0.5, 0.5: 1.0}


def test_tar_at_far_counts_the_empty_operating_point():
    # the best score is an impostor: only the nothing-accepted point has FAR 0, with TAR 0
    scores = np.array([0.9, 0.5, 0.4, 0.3], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    nearest, strict = tar_at_far(scores, labels, [0.0, 0.2])
    assert strict == {0.0: 0.0, 0.2: 0.0}
    assert nearest == {0.0: 0.0, 0.2: 0.0}


def test_tar_strict_rule_never_exceeds_the_target_far():
    rng = np.random.default_rng(11)
    scores = np.round(rng.random(400), 2)
    labels = rng.random(400) < 0.5
    _, strict = tar_at_far(scores, labels, FAR_TARGETS)
    for far, tar in strict.items():
        # the loosest threshold achieving this TAR must keep FAR within the target
        thr = np.sort(scores[labels])[::-1][round(tar * labels.sum()) - 1] if tar > 0 else np.inf
        assert np.count_nonzero(scores[~labels] >= thr) / np.count_nonzero(~labels) <= far


def test_tar_at_far_returns_float_keys_and_values_for_the_default_targets():
    rng = np.random.default_rng(3)
    nearest, strict = tar_at_far(rng.random(50), rng.random(50) < 0.5)
    assert list(nearest) == list(FAR_TARGETS) == list(strict)
    assert all(type(v) is float for v in (*nearest.values(), *strict.values()))


def test_tar_at_far_refuses_a_single_class_bad_labels_and_non_finite_scores():
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(ValueError, match="label 1 is 2"):
        tar_at_far(np.array([0.1, 0.2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="finite"):
        tar_at_far(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="one entry per score"):
        tar_at_far(np.array([0.1, 0.2]), np.array([1, 0, 1]))


def test_tar_keys_format_far_like_str_float():
    assert tar_keys({1e-6: 0.5, 1e-4: 0.25, 0.1: 1.0}) == {"1e-06": 0.5, "0.0001": 0.25, "0.1": 1.0}


# ----------------------------------------------------------------------------------------------------
# identification
# ----------------------------------------------------------------------------------------------------

def random_search(rng: np.random.Generator, exact: bool):
    """A gallery with 1-3 templates per subject and probes of enrolled and unenrolled subjects."""
    g_subj = np.repeat(np.arange(12), rng.integers(1, 4, 12))
    p_subj = rng.integers(0, 20, 60)  # subjects 12..19 are not enrolled: non-mated probes
    make = (lambda n: sign_vectors(rng, n, 4)) if exact else (lambda n: unit_rows(rng, n, 8))
    return make(g_subj.size), g_subj, make(p_subj.size), p_subj


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("exact", [True, False])
def test_identification_matches_a_per_probe_brute_force_search(seed, exact, monkeypatch):
    rng = np.random.default_rng(seed)
    g, g_subj, p, p_subj = random_search(rng, exact)
    ranks, fpirs = (1, 2, 5, 10), (0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0)
    want = ref_identification(g, g_subj, p, p_subj, ranks, fpirs)
    assert want["mated"] and want["non_mated"]
    assert identification(g, g_subj, p, p_subj, ranks, fpirs) == want
    monkeypatch.setattr(ijb_scoring, "_SEARCH_BLOCK_FLOATS", 50)  # a few probes per block
    assert identification(g, g_subj, p, p_subj, ranks, fpirs) == want


def test_identification_rank_lets_a_mate_win_a_tie_and_counts_other_subjects_templates():
    g = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8], [1, 0]], dtype=np.float32)
    g_subj = np.array([7, 8, 7, 9, 8])
    p = np.array([[1, 0]], dtype=np.float32)
    out = identification(g, g_subj, p, np.array([7]), ranks=(1,), fpirs=())
    assert out["rank"] == {1: 1.0}  # non-mates 8 tie mate 7 at 1.0: still rank 1
    # best mate of subject 9 scores 0.6; three templates of other subjects (7, 8, 8) score 1.0: rank 4
    out = identification(g, g_subj, p, np.array([9]), ranks=(3, 4))
    assert out["rank"] == {3: 0.0, 4: 1.0}


def test_identification_tpir_threshold_reads_fpir_as_a_decimal():
    # 100 non-mated probes with distinct top-1 scores; FPIR 0.29 allows 29 of them above tau, so tau is the
    # 30th largest. The mated probe scores between the 30th and the 29th: a hit only if 29 are allowed
    # (binary floor(0.29 * 100) = floor(28.999999999999996) = 28 would make tau the 29th and miss it).
    assert 0.29 * 100 < 29
    rng = np.random.default_rng(0)
    g = np.array([[1.0, 0.0]], dtype=np.float32)
    angles = np.r_[np.linspace(0.1, 1.5, 100), 0.1 + 1.4 * 28.5 / 99][rng.permutation(101)]
    p = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    p_subj = np.where(angles == 0.1 + 1.4 * 28.5 / 99, 0, np.arange(1, 102))
    assert np.count_nonzero(p_subj == 0) == 1
    out = identification(g, np.array([0]), p, p_subj, ranks=(1,), fpirs=(0.29, 0.28))
    assert out["tpir_at_fpir"] == {0.29: 1.0, 0.28: 0.0}
    assert out == ref_identification(g, np.array([0]), p, p_subj, (1,), (0.29, 0.28))


def test_identification_tpir_is_none_without_non_mated_probes_and_rank_none_without_mated():
    rng = np.random.default_rng(1)
    g = unit_rows(rng, 3, 4)
    out = identification(g, np.array([1, 2, 3]), g, np.array([1, 2, 3]))
    assert out["non_mated"] == 0 and out["tpir_at_fpir"] == dict.fromkeys(FPIR_TARGETS)
    assert out["rank"] == dict.fromkeys(RANKS, 1.0)
    out = identification(g, np.array([1, 2, 3]), g, np.array([4, 5, 6]))
    assert out["mated"] == 0 and out["rank"] == dict.fromkeys(RANKS)


def test_identification_refuses_unnormalised_features():
    with pytest.raises(ValueError, match="gallery_feats"):
        identification(np.array([[2.0, 0.0]]), np.array([1]), np.array([[1.0, 0.0]]), np.array([1]))


@pytest.mark.parametrize("seed", SEEDS)
def test_open_set_identification_ranks_on_the_union_and_averages_tpir_over_the_two_galleries(seed):
    rng = np.random.default_rng(seed)
    g, g_subj, p, p_subj = random_search(rng, exact=True)
    p_subj = p_subj % 12  # every probe enrolled in G1 or G2, as on the real release
    in_g1 = g_subj < 6
    g1, g2 = (g[in_g1], g_subj[in_g1]), (g[~in_g1], g_subj[~in_g1])
    out = open_set_identification(g1, g2, (p, p_subj))
    union = ref_identification(g, g_subj, p, p_subj, RANKS, FPIR_TARGETS)
    assert union["non_mated"] == 0
    halves = [ref_identification(*gi, p, p_subj, RANKS, FPIR_TARGETS) for gi in (g1, g2)]
    assert out == {
        "probes": p.shape[0],
        "gallery": g.shape[0],
        "rank1": union["rank"][1],
        "rank5": union["rank"][5],
        "rank10": union["rank"][10],
        "tpir_at_fpir": {f: (halves[0]["tpir_at_fpir"][f] + halves[1]["tpir_at_fpir"][f]) / 2
                         for f in FPIR_TARGETS},
    }


def test_open_set_identification_refuses_galleries_that_share_a_subject():
    g = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="disjoint"):
        open_set_identification((g, np.array([1, 2])), (g, np.array([2, 3])), (g, np.array([1, 2])))
