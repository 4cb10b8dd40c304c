"""Scoring math of the IJB-B / IJB-C face-recognition protocol, in plain numpy.

The pipeline follows insightface's ``recognition/arcface_torch/eval_ijbc.py`` so that figures compare
with the published tables:

1. :func:`image_features` — per image ``f = e(x) + e(flip(x))``, optionally L2-normalised, optionally
   scaled by the detector's faceness score. Leaving ``f`` un-normalised ("norm score") makes the norm of
   the embedding act as a quality weight in the template average.
2. :func:`template_features` — per template ``normalize(Σ_media mean_{images of the media} f)``: frames
   of one video are averaged first so that a long video does not outweigh a single still.
3. :func:`pair_scores` — cosine similarity of template pairs (1:1 verification).
4. :func:`tar_at_far` — TAR at FAR targets from the ROC over all pairs.
5. :func:`identification` / :func:`open_set_identification` — 1:N search: CMC rank-k and NIST open-set
   TPIR at FPIR.

Everything here is data-independent math; reading the protocol files and running the network live
elsewhere. The functions are sized for IJB-C (469,375 images, 23,124 templates, 15,658,489 pairs,
19.6k probes x 3.5k gallery templates) on a small CPU machine: no Python loop runs once per image,
per pair or per ordinary template, and the large intermediates are processed in bounded chunks.
Measured there (random data, 2 cores): the whole 1:1 + 1:N scoring in ~12 s, peak RSS ~3.3 GB of which
~2.3 GB are the inputs themselves (embeddings, flips, pair lists).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

FAR_TARGETS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
RANKS: tuple[int, ...] = (1, 5, 10)
FPIR_TARGETS: tuple[float, ...] = (0.01, 0.1)

# Rows handled per step when a (n, d) float32 array is re-read in float64 for its row norms:
# 16,384 x 512 x 8 B = 64 MiB of temporaries, whatever n is (image_features already holds 3 (n, d) arrays).
_ROW_CHUNK = 1 << 14
# template_features: templates accumulated together (8,192 x 512 x 8 B = 32 MiB of float64 sums), and the
# size above which a template is summed on its own by a BLAS dot product rather than image by image.
_TEMPLATE_BLOCK = 1 << 13
_BIG_TEMPLATE = 256
# Size (in float32 entries) of one block of the template-similarity matrix in pair_scores: 8 Mi entries =
# 32 MiB, about the L3 cache, so the scattered reads that pick the pairs' entries out of it stay cached.
_SIM_BLOCK_FLOATS = 1 << 23
# Probe x gallery similarities per step in identification: 4 Mi float32 entries = 16 MiB.
_SEARCH_BLOCK_FLOATS = 1 << 22
# How far L2-normalised rows may be from unit norm (float32 rounding is ~1e-7; 1e-3 catches real misuse).
_UNIT_NORM_ATOL = 1e-3


class UnknownTemplateError(ValueError):
    """A verification pair names a template id that has no template feature.

    Carries the first offending pair (in pair order) so that a caller can point at the protocol line:
    ``pair_index`` is the 0-based position in ``t1``/``t2``, ``template_id`` the missing id.
    """

    def __init__(self, pair_index: int, template_id: int) -> None:
        self.pair_index = int(pair_index)
        self.template_id = int(template_id)
        super().__init__(f"pair {self.pair_index} names template id {self.template_id}, which has no "
                         "template feature (absent from template_ids)")


# --------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------

def _as_ids(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    """1-D int64 id array. Floats are refused rather than truncated: a protocol file parsed as float
    means a parsing bug upstream, and silently flooring 3.9 to 3 would mis-assign images."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} entries, expected {n}")
    return a.astype(np.int64, copy=False)


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {a.shape}")
    if a.dtype.kind != "f":
        raise ValueError(f"{name} must be floating point, got dtype {a.dtype}")
    return a


def _row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of every row, accumulated in float64 chunk by chunk: float32 squares of large
    un-normalised embeddings cannot overflow this way, and the float64 copy never exceeds one chunk."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for a in range(0, x.shape[0], _ROW_CHUNK):
        block = x[a: a + _ROW_CHUNK].astype(np.float64)
        out[a: a + _ROW_CHUNK] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def _check_unit_rows(x: np.ndarray, name: str) -> None:
    """Cosine similarity is computed as a plain dot product, which is only right for unit rows."""
    norms = _row_norms(x)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= _UNIT_NORM_ATOL))  # also catches NaN
    if bad.size:
        raise ValueError(f"{name} must be L2-normalised rows; row {int(bad[0])} has norm {norms[bad[0]]:.6g} "
                         f"({bad.size} such rows)")


def _as_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size != n:
        raise ValueError(f"labels must be 1-D with one entry per score ({n}), got shape {y.shape}")
    if y.dtype == np.bool_:
        return y
    if y.dtype.kind not in "iuf":
        raise ValueError(f"labels must be 1 (genuine) / 0 (impostor), got dtype {y.dtype}")
    genuine = y == 1
    if not np.all(genuine | (y == 0)):
        bad = int(np.flatnonzero(~(genuine | (y == 0)))[0])
        raise ValueError(f"labels must be 1 (genuine) / 0 (impostor); label {bad} is {y[bad].item()!r}")
    return genuine


# --------------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------------

def image_features(emb: np.ndarray, emb_flip: np.ndarray | None, detector_scores: np.ndarray,
                   norm_weight: bool = True, detector_weight: bool = True) -> np.ndarray:
    """Per-image feature (n, d) float32 as insightface's ``eval_ijbc`` builds it.

    ``f = emb + emb_flip`` (``emb`` alone when ``emb_flip`` is None), left un-normalised. WHY: the norm
    of the flip-summed embedding tends to be larger for clear, frontal faces than for blurred or occluded
    ones, and the two views agree more, so keeping it makes the template average a quality-weighted
    average ("norm score", insightface's default). With
    ``norm_weight=False`` every row is scaled to unit norm instead (each image counts equally). With
    ``detector_weight=True`` the row is then multiplied by the detector's faceness score, which
    down-weights detections that are probably not faces (``detector_scores`` is ignored otherwise).

    Raises ValueError naming the row for a non-finite row (always: a NaN would silently poison its whole
    template), for a zero row when it must be normalised (it has no direction), and for a negative or
    non-finite detector score (a negative weight would flip the face's direction, not weigh it).
    """
    emb = _as_features(emb, "emb")
    n = emb.shape[0]
    f = emb.astype(np.float32, copy=True)  # a private copy: everything below is in place
    if emb_flip is not None:
        emb_flip = _as_features(emb_flip, "emb_flip")
        if emb_flip.shape != emb.shape:
            raise ValueError(f"emb_flip has shape {emb_flip.shape}, emb has {emb.shape}")
        f += emb_flip
    norms = _row_norms(f)
    bad = np.flatnonzero(~np.isfinite(norms))
    if bad.size:
        raise ValueError(f"image feature row {int(bad[0])} is not finite ({bad.size} such rows)")
    if not norm_weight:
        zero = np.flatnonzero(norms == 0)
        if zero.size:
            raise ValueError(f"image feature row {int(zero[0])} is zero and cannot be L2-normalised "
                             f"({zero.size} such rows)")
        f /= norms[:, None].astype(np.float32)
    if detector_weight:
        s = np.asarray(detector_scores)
        if s.shape != (n,):
            raise ValueError(f"detector_scores must have shape ({n},), got {s.shape}")
        bad = np.flatnonzero(~(np.isfinite(s) & (s >= 0)))
        if bad.size:
            raise ValueError(f"detector score of row {int(bad[0])} is {s[bad[0]].item()!r}; faceness "
                             "weights must be finite and >= 0")
        f *= s.astype(np.float32)[:, None]
    return f


def template_features(features: np.ndarray, templates: np.ndarray, media: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per template: ``normalize(Σ_m mean_{i in (template, m)} features[i])``.

    Returns ``(template_ids, feats)``: the sorted unique template ids (int64, (T,)) and their
    L2-normalised features (float32, (T, d)), row k belonging to ``template_ids[k]``.

    Image i belongs to template ``templates[i]`` and media ``media[i]``. Media are grouped by the
    (template, media) pair because IJB reuses a media id (a video, a still) in several templates. WHY the
    two-level average: a video contributes dozens of near-identical frames; averaging them into one media
    feature first keeps it from outweighing a single still.

    How: the two levels collapse into one weighted sum, ``Σ_m (1/|m|) Σ_{i∈m} f_i = Σ_i f_i / |m(i)|``,
    accumulated in float64 (exact to far below float32 output precision). After one lexsort by
    (template, media), templates are taken largest first in blocks of ``_TEMPLATE_BLOCK``; within a
    block, step j adds the j-th image of every template that has more than j images, one vectorised
    gather for all of them. Templates with more than ``_BIG_TEMPLATE`` images are summed on their own
    with a BLAS dot product instead, so the loops run at most ``_BIG_TEMPLATE + n / _TEMPLATE_BLOCK``
    steps plus ``n / _BIG_TEMPLATE`` big templates — never once per template or per image. Measured on
    IJB-C-sized random data (469,375 x 512-d into 23,124 templates, 2 cores): ~1.3 s, where
    ``np.add.reduceat`` over media groups then templates took ~15 s (it walks each column of a
    C-ordered block with a 4 KiB stride). Beyond a few O(n) index arrays, temporaries stay under ~100 MiB
    (one block of float64 sums and one step's gathered rows) whatever n is.

    A template whose summed feature is zero (or not finite) raises ValueError naming the template id
    (the smallest such id).
    """
    features = _as_features(features, "features")
    n, d = features.shape
    if n == 0:
        raise ValueError("template_features: no images")
    templates = _as_ids(templates, "templates", n)
    media = _as_ids(media, "media", n)

    order = np.lexsort((media, templates))  # sorted position -> image row, by template then media
    t_sorted, m_sorted = templates[order], media[order]
    new_template = np.ones(n, dtype=bool)
    new_template[1:] = t_sorted[1:] != t_sorted[:-1]
    new_group = new_template.copy()
    new_group[1:] |= m_sorted[1:] != m_sorted[:-1]
    t_start = np.flatnonzero(new_template)  # (T,) first sorted position of each template
    template_ids = t_sorted[t_start]
    t_size = np.diff(np.r_[t_start, n])
    g_size = np.diff(np.r_[np.flatnonzero(new_group), n])
    weight = np.repeat(1.0 / g_size, g_size)  # 1/|media group| at each sorted position
    del t_sorted, m_sorted, new_template, new_group

    result = np.empty((template_ids.size, d), dtype=np.float32)
    bad: list[int] = []  # template indices whose sum cannot be normalised
    largest_first = np.argsort(-t_size, kind="stable")
    for b0 in range(0, template_ids.size, _TEMPLATE_BLOCK):
        block = largest_first[b0: b0 + _TEMPLATE_BLOCK]
        sizes, starts = t_size[block], t_start[block]
        acc = np.zeros((block.size, d), dtype=np.float64)
        n_big = int(np.count_nonzero(sizes > _BIG_TEMPLATE))  # a prefix: sizes are descending
        for k in range(n_big):
            for a in range(int(starts[k]), int(starts[k] + sizes[k]), _TEMPLATE_BLOCK):
                e = min(a + _TEMPLATE_BLOCK, int(starts[k] + sizes[k]))
                acc[k] += weight[a:e] @ features[order[a:e]].astype(np.float64)
        if n_big < block.size:
            small_starts = starts[n_big:]
            # n_longer[j] = how many of these templates have more than j images (sizes are descending)
            n_longer = np.searchsorted(-sizes[n_big:], -np.arange(sizes[n_big]), side="left")
            for j, c in enumerate(n_longer):
                pos = small_starts[:c] + j
                acc[n_big: n_big + c] += weight[pos, None] * features[order[pos]]
        norms = np.sqrt(np.einsum("ij,ij->i", acc, acc))
        ok = np.isfinite(norms) & (norms > 0)
        bad.extend(block[~ok].tolist())
        result[block] = acc / np.where(ok, norms, 1.0)[:, None]
    if bad:
        first = int(template_ids[min(bad)])
        raise ValueError(f"template {first} has a zero or non-finite summed feature and cannot be "
                         f"L2-normalised ({len(bad)} such templates)")
    return template_ids, result


# --------------------------------------------------------------------------------------------------------
# 1:1 verification
# --------------------------------------------------------------------------------------------------------

def _id_positions(template_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each queried id in ``template_ids`` (unique), -1 where absent.

    A lookup table over the id range when that range is small (at most max(8 T, 16 Mi) ids, 64 MiB):
    one gather, ~15x faster than a binary search per pair at 15.7M pairs (0.1 s against 1.7 s per
    side); otherwise ``searchsorted`` on the sorted ids."""
    lo, hi = int(template_ids.min()), int(template_ids.max())
    if hi - lo < max(8 * template_ids.size, 1 << 24):
        lut = np.full(hi - lo + 1, -1, dtype=np.int32)
        lut[template_ids - lo] = np.arange(template_ids.size, dtype=np.int32)
        inside = (query >= lo) & (query <= hi)
        pos = np.full(query.shape, -1, dtype=np.int32)
        pos[inside] = lut[query[inside] - lo]
        return pos
    sorter = np.argsort(template_ids, kind="stable")
    i = np.minimum(np.searchsorted(template_ids, query, sorter=sorter), template_ids.size - 1)
    pos = sorter[i].astype(np.int32)
    pos[template_ids[pos] != query] = -1
    return pos


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                chunk: int = 1 << 17) -> np.ndarray:
    """Cosine score (float32, (P,)) of each pair ``(t1[k], t2[k])`` of template ids.

    ``template_feats`` rows must be L2-normalised (as :func:`template_features` returns them), so the
    cosine is the dot product.

    Method — a blocked matmul, chosen by measurement. On 23,124 x 512-d templates and 15.7M random
    pairs on 2 cores, gathering both rows of every pair and taking row-wise dot products (insightface's
    way) took 19-29 s: it moves 4 KiB per pair through memory. Computing the whole similarity matrix
    block by block with BLAS (5.5e11 flops, ~4 s at ~140 GFLOP/s) and picking each pair's entry out of
    its block took ~6.5 s in all. Only the templates that occur as ``t1`` (rows) and as ``t2`` (columns)
    enter the product, so a protocol whose pairs join two smaller sets pays only for their product.
    Pairs are bucketed by row block with a stable radix sort of 16-bit block numbers (O(P)); each block
    of similarities is ``_SIM_BLOCK_FLOATS`` entries (32 MiB), and the entries are picked out
    ``chunk`` pairs at a time, so memory beyond the O(P) index arrays (~24 B per pair) stays bounded.

    Raises UnknownTemplateError for the first pair (in pair order) naming an id absent from
    ``template_ids`` — the id in ``t1`` when both are absent.
    """
    template_ids = _as_ids(template_ids, "template_ids")
    feats = _as_features(template_feats, "template_feats")
    if feats.shape[0] != template_ids.size:
        raise ValueError(f"{template_ids.size} template ids for {feats.shape[0]} template features")
    if template_ids.size == 0:
        raise ValueError("pair_scores: no templates")
    if np.unique(template_ids).size != template_ids.size:
        raise ValueError("template_ids must be unique")
    t1 = _as_ids(t1, "t1")
    t2 = _as_ids(t2, "t2", t1.size)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_unit_rows(feats, "template_feats")
    feats = feats.astype(np.float32, copy=False)
    n_pairs = t1.size
    out = np.empty(n_pairs, dtype=np.float32)
    if n_pairs == 0:
        return out

    i1 = _id_positions(template_ids, t1)
    i2 = _id_positions(template_ids, t2)
    missing = (i1 < 0) | (i2 < 0)
    if missing.any():
        k = int(np.argmax(missing))
        raise UnknownTemplateError(k, int(t1[k]) if i1[k] < 0 else int(t2[k]))

    # Compact to the templates actually used on each side: row r of the product is template rows[r].
    n_templates = template_ids.size
    rows = np.flatnonzero(np.bincount(i1, minlength=n_templates))
    cols = np.flatnonzero(np.bincount(i2, minlength=n_templates))
    row_of = np.zeros(n_templates, dtype=np.int32)
    row_of[rows] = np.arange(rows.size, dtype=np.int32)
    col_of = np.zeros(n_templates, dtype=np.int32)
    col_of[cols] = np.arange(cols.size, dtype=np.int32)
    r = row_of[i1]
    c = col_of[i2]
    del i1, i2

    block_rows = max(1, _SIM_BLOCK_FLOATS // cols.size)
    n_blocks = -(-rows.size // block_rows)
    block = r // block_rows
    # 16-bit keys make numpy's stable sort a radix sort: O(P), ~0.5 s at 15.7M pairs
    block = block.astype(np.int16 if n_blocks <= np.iinfo(np.int16).max else np.int64)
    order = np.argsort(block, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(block, minlength=n_blocks))]
    del block

    row_feats = feats[rows]
    col_feats_t = np.ascontiguousarray(feats[cols].T)  # (d, C): contiguous operand is ~10% faster in sgemm
    for k in range(n_blocks):
        r0 = k * block_rows
        sim = (row_feats[r0: r0 + block_rows] @ col_feats_t).ravel()  # cos of rows r0.. x all columns
        for a in range(int(bounds[k]), int(bounds[k + 1]), chunk):
            sel = order[a: min(a + chunk, int(bounds[k + 1]))]
            out[sel] = sim[(r[sel] - r0).astype(np.int64) * cols.size + c[sel]]
    return out


def _far_index_below(n_neg: int, target: float) -> int:
    """Largest k in [0, n_neg] with ``k / n_neg <= target`` in float64, exactly as a FAR array computed
    by ``fp / n_neg`` compares (int(target * n_neg) can be off by one either way through rounding)."""
    k = min(n_neg, max(0, int(target * n_neg)))
    while k < n_neg and (k + 1) / n_neg <= target:
        k += 1
    while k > 0 and k / n_neg > target:
        k -= 1
    return k


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FAR_TARGETS
               ) -> tuple[dict[float, float], dict[float, float]]:
    """TAR at each FAR target from the ROC over all pairs; returns ``(nearest, strict)`` dicts far -> TAR.

    ROC: labels 1 genuine / 0 impostor; a pair is accepted when ``score >= threshold``; one ROC point per
    distinct score (FAR = accepted impostors / impostors, TAR = accepted genuines / genuines) plus the
    point (0, 0) where nothing is accepted.

    * ``nearest`` — the "published" rule of insightface's ``eval_ijbc`` (so figures compare with papers'
      tables): the ROC point whose FAR is nearest the target; on a tie in distance (including the several
      points sharing one FAR, i.e. a vertical run of the ROC) the larger TAR. insightface gets that tie
      rule by flipping sklearn's ROC before ``min(zip(|fpr - target|, index))``.
    * ``strict`` — the largest TAR among ROC points with FAR <= target (an operating point one could
      actually deploy at that FAR).

    How, without materialising the ROC: FAR only moves when an impostor is accepted, so the ROC points are
    determined by the impostors' order statistics. Let ``v_0 >= v_1 >= ...`` be the impostor scores
    sorted descending. The points with FAR = k/N_imp exist exactly for k = 0 and for k closing a group of
    tied impostors (``v_{k-1} > v_k`` or k = N_imp), and the top of that vertical run, reached by lowering
    the threshold down to just above ``v_k``, has TAR = #(genuine > v_k) / N_gen (1 for k = N_imp). For a
    target t, the candidates are the largest such k with k/N <= t and the smallest with k/N > t; every
    other point is farther from t or has a smaller TAR. Cost: one ``np.sort`` of the impostor scores
    (O(P log P), SIMD, ~0.3 s at 15.7M float32) and binary searches, ~10x faster than an argsort of all
    pairs; memory ~2 copies of the scores.

    Raises ValueError if there are no genuine or no impostor pairs, or a score is not finite.
    """
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if s.dtype.kind not in "iuf":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    genuine = _as_labels(labels, s.size)
    if not np.all(np.isfinite(s)):
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"score {bad} is {s[bad].item()!r}; scores must be finite")
    pos = np.sort(s[genuine])
    neg = np.sort(s[~genuine])
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"tar_at_far needs genuine and impostor pairs, got {n_pos} genuine and {n_neg} "
                         "impostor")

    def run_start(k: int) -> int:
        """Smallest reachable impostor count in the tie group of v_k: #(impostors > v_k)."""
        return k if k == n_neg else n_neg - int(np.searchsorted(neg, neg[n_neg - 1 - k], side="right"))

    def run_end(k: int) -> int:
        """Largest reachable impostor count in the tie group of v_k: #(impostors >= v_k)."""
        return k if k == n_neg else n_neg - int(np.searchsorted(neg, neg[n_neg - 1 - k], side="left"))

    def top_tar(k: int) -> float:
        """TAR at the top of the vertical ROC run at FAR k/N_imp (k reachable)."""
        if k == n_neg:
            return 1.0
        v_k = neg[n_neg - 1 - k]  # k-th largest impostor score, 0-based
        return (n_pos - int(np.searchsorted(pos, v_k, side="right"))) / n_pos

    nearest: dict[float, float] = {}
    strict: dict[float, float] = {}
    for far in fars:
        t = float(far)
        if not (np.isfinite(t) and t >= 0):
            raise ValueError(f"FAR target must be finite and >= 0, got {far!r}")
        k_star = _far_index_below(n_neg, t)
        # largest reachable k with k/N <= t (k_star itself may sit inside a group of tied impostors)
        k_lo = run_start(k_star)
        strict[t] = top_tar(k_lo)
        best_k = k_lo
        if k_star < n_neg:
            k_hi = run_end(k_star)  # smallest reachable k with k/N > t
            if k_hi / n_neg - t <= t - k_lo / n_neg:  # |far - t| in float64, as a brute-force argmin sees it
                best_k = k_hi
        nearest[t] = top_tar(best_k)
    return nearest, strict


def tar_keys(d: dict[float, float]) -> dict[str, float]:
    """FAR-keyed dict with ``str(float)`` keys ("1e-06", "0.0001") for JSON, which has no float keys."""
    return {str(float(k)): float(v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------------------
# 1:N identification
# --------------------------------------------------------------------------------------------------------

def _fpir_count(fpir: float, n: int) -> int:
    """floor(fpir * n) with fpir read as the decimal it prints as: 0.29 * 100 is 28.999999999999996 in
    binary, but "at most 29% of 100 non-mated searches" allows 29 false alarms."""
    return int(Fraction(repr(float(fpir))) * n)  # int() of a non-negative Fraction floors


def identification(gallery_feats: np.ndarray, gallery_subjects: np.ndarray, probe_feats: np.ndarray,
                   probe_subjects: np.ndarray, ranks: Sequence[int] = RANKS,
                   fpirs: Sequence[float] = FPIR_TARGETS) -> dict[str, Any]:
    """Template-level 1:N search with cosine similarity (all feature rows L2-normalised).

    Mated probes are those whose subject has at least one template in the gallery; non-mated, the rest.
    Returns ``{"mated": int, "non_mated": int, "rank": {k: rate}, "tpir_at_fpir": {fpir: rate}}``.

    * Rank-k identification rate (CMC), over mated probes: the fraction whose rank is <= k, where
      rank = 1 + the number of gallery templates of OTHER subjects scoring strictly higher than the
      probe's best-scoring mate template. Tie rule: a non-mate that ties the best mate does not push it
      down (ties resolve in the mate's favour), and the probe's other mate templates never count.
      None when there are no mated probes.
    * TPIR at FPIR (NIST open-set, candidate list of length 1): the threshold tau is set on the non-mated
      probes' top-1 scores so that the fraction of them scoring > tau is <= fpir and as large as possible:
      with N_nm non-mated probes and m = floor(fpir * N_nm), tau is the (m+1)-th largest non-mated top-1
      score, or -inf when m >= N_nm. TPIR = the fraction of mated probes whose top-1 gallery template is a
      mate (rank 1 under the tie rule above, so a top-1 tie with a non-mate counts as a hit) and whose
      top-1 score is > tau. None when there are no non-mated (or no mated) probes.

    The probe x gallery similarity is computed in chunks of probes (``_SEARCH_BLOCK_FLOATS`` entries)
    with one BLAS matmul each, so memory does not grow with the number of probes.
    """
    g = _as_features(gallery_feats, "gallery_feats")
    p = _as_features(probe_feats, "probe_feats")
    g_subj = np.asarray(gallery_subjects)
    p_subj = np.asarray(probe_subjects)
    if g_subj.shape != (g.shape[0],):
        raise ValueError(f"gallery_subjects must have shape ({g.shape[0]},), got {g_subj.shape}")
    if p_subj.shape != (p.shape[0],):
        raise ValueError(f"probe_subjects must have shape ({p.shape[0]},), got {p_subj.shape}")
    if g.shape[0] == 0:
        raise ValueError("identification: empty gallery")
    if p.shape[1] != g.shape[1]:
        raise ValueError(f"probe features are {p.shape[1]}-d, gallery features {g.shape[1]}-d")
    ranks = [int(k) for k in ranks]
    if any(k < 1 for k in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    _check_unit_rows(g, "gallery_feats")
    _check_unit_rows(p, "probe_feats")
    g32 = g.astype(np.float32, copy=False)
    g_t = np.ascontiguousarray(g32.T)

    n_probes = p.shape[0]
    mated = np.isin(p_subj, g_subj)
    rank = np.zeros(n_probes, dtype=np.int64)  # meaningful for mated probes only
    top1 = np.empty(n_probes, dtype=np.float64)
    step = max(1, _SEARCH_BLOCK_FLOATS // g.shape[0])
    for a in range(0, n_probes, step):
        sim = p[a: a + step].astype(np.float32, copy=False) @ g_t  # (c, G) cosine similarities
        top1[a: a + step] = sim.max(axis=1)
        is_mate = p_subj[a: a + step, None] == g_subj[None, :]
        best_mate = np.where(is_mate, sim, -np.inf).max(axis=1)
        # other-subject templates strictly above the best mate; mates cannot exceed their own maximum
        rank[a: a + step] = 1 + np.count_nonzero((sim > best_mate[:, None]) & ~is_mate, axis=1)

    n_mated = int(mated.sum())
    n_non_mated = n_probes - n_mated
    mated_rank = rank[mated]
    rank_rates: dict[int, float | None] = {
        k: (float(np.count_nonzero(mated_rank <= k)) / n_mated if n_mated else None) for k in ranks}

    non_mated_top1 = np.sort(top1[~mated])[::-1]  # descending
    hit_top1 = top1[mated][mated_rank == 1]  # top-1 scores of mated probes whose top-1 is a mate
    tpir: dict[float, float | None] = {}
    for fpir in fpirs:
        f = float(fpir)
        if not (np.isfinite(f) and f >= 0):
            raise ValueError(f"FPIR target must be finite and >= 0, got {fpir!r}")
        if n_non_mated == 0 or n_mated == 0:
            tpir[f] = None
            continue
        m = _fpir_count(f, n_non_mated)
        tau = -np.inf if m >= n_non_mated else non_mated_top1[m]  # the (m+1)-th largest
        tpir[f] = float(np.count_nonzero(hit_top1 > tau)) / n_mated
    return {"mated": n_mated, "non_mated": n_non_mated, "rank": rank_rates, "tpir_at_fpir": tpir}


def open_set_identification(g1: tuple[np.ndarray, np.ndarray], g2: tuple[np.ndarray, np.ndarray],
                            probes: tuple[np.ndarray, np.ndarray], ranks: Sequence[int] = RANKS,
                            fpirs: Sequence[float] = FPIR_TARGETS) -> dict[str, Any]:
    """IJB's 1:N protocol with two disjoint galleries (IJB-C G1/G2, IJB-B S1/S2).

    Each argument is a ``(feats, subjects)`` tuple. Closed-set rank-k is measured on the union gallery
    G1 ∪ G2 over the probes mated in it. TPIR at FPIR is the mean over the two galleries of
    :func:`identification` (Gi, probes): the probes of the other gallery's subjects are Gi's non-mated
    searches. WHY the split: on the real release every probe's subject is enrolled in G1 or G2, so the
    union has no non-mated probes and an open-set figure can only come from searching each half alone.

    Returns ``{"probes": N, "gallery": |G1|+|G2|, "rank1": .., "rank5": .., "rank10": .., "tpir_at_fpir":
    {0.01: .., 0.1: ..}}`` (one ``rank{k}`` key per entry of ``ranks``); a TPIR is None when either
    gallery has no non-mated or no mated probes. Raises ValueError when the galleries share a subject,
    which would make a mated search count as non-mated.
    """
    (f1, s1), (f2, s2), (fp, sp) = g1, g2, probes
    s1, s2 = np.asarray(s1), np.asarray(s2)
    shared = np.intersect1d(s1, s2)
    if shared.size:
        raise ValueError(f"the two galleries must have disjoint subjects; {shared.size} shared, e.g. "
                         f"{shared[0].item()!r}")
    union = identification(np.concatenate([np.asarray(f1), np.asarray(f2)]), np.concatenate([s1, s2]),
                           fp, sp, ranks=ranks, fpirs=())
    halves = [identification(f, s, fp, sp, ranks=(), fpirs=fpirs) for f, s in ((f1, s1), (f2, s2))]
    tpir: dict[float, float | None] = {}
    for fpir in fpirs:
        v = [h["tpir_at_fpir"][float(fpir)] for h in halves]
        tpir[float(fpir)] = None if None in v else (v[0] + v[1]) / 2
    out: dict[str, Any] = {"probes": int(np.asarray(fp).shape[0]), "gallery": int(s1.size + s2.size)}
    out.update({f"rank{k}": v for k, v in union["rank"].items()})
    out["tpir_at_fpir"] = tpir
    return out
