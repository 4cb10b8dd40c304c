"""Five facial landmarks → the 112×112 ArcFace crop: one least-squares similarity, one warp.

One home for alignment, shared by ``fr_eval --ijb`` (IJB loose crops) and ``fr_pack --landmarks``
(a user's raw photos), so evaluation and training data are cropped the same way.

The transform is the similarity (rotation, uniform scale, translation; no reflection, no shear)
that maps the five detected points onto :data:`ARCFACE_TEMPLATE_112` with the least summed
squared error: Umeyama's closed form (S. Umeyama, "Least-squares estimation of transformation
parameters between two point patterns", TPAMI 1991, eqs. 34–43), written out below because it is
twelve lines of numpy. The warp is OpenCV's ``cv2.warpAffine`` (bilinear). WHY OpenCV rather than
scikit-image: its warp is C++ that releases the GIL (extraction threads warp in parallel), takes
uint8 in and out (scikit-image converts to float64 and back, ~10× the memory traffic), and the
headless wheel carries no GUI libraries; scikit-image would also pull scipy for this one call.
"""

from __future__ import annotations

import cv2
import numpy as np

# The five-point reference of insightface's ArcFace crops at 112×112 (left eye, right eye, nose
# tip, left and right mouth corner; x, y in pixels). Every public IJB/MS1M/Glint/WebFace release
# packed by insightface is aligned to it, so models trained on those expect it.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def template_for(size: int) -> np.ndarray:
    """The reference points for a square crop of side ``size`` (the 112 template scaled)."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2×3 matrix ``M = [sR | t]`` minimising ``Σ ||s·R·src_i + t − dst_i||²`` (Umeyama 1991).

    ``src`` and ``dst`` are ``(n, 2)`` point sets, n ≥ 2, not all equal. Raises ValueError for
    points that are not finite or all coincide (no scale can be estimated).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform: want two (n, 2) point sets with n >= 2, got {src.shape} and {dst.shape}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise ValueError("similarity_transform: landmarks must be finite")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_src, dst - mu_dst
    var_src = float((a ** 2).sum()) / len(src)  # σ²_x (eq. 36)
    if var_src <= 1e-12:
        raise ValueError("similarity_transform: the landmarks all coincide; no face can be aligned from them")
    cov = b.T @ a / len(src)  # Σ_xy (eq. 38)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # S = diag(1, -1) when det Σ_xy < 0 (eq. 39): no mirror
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt  # R = U S Vᵀ (eq. 40)
    scale = float((d * sign).sum()) / var_src  # c = tr(DS) / σ²_x (eq. 42)
    translation = mu_dst - scale * rotation @ mu_src  # t = μ_y − c R μ_x (eq. 41)
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size``×``size`` crop of ``image`` (H×W×C uint8) whose five ``landmarks`` (5×2, x y in
    pixels of ``image``) land on the ArcFace template. Pixels outside the image are black, as in
    insightface's crops."""
    matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template_for(size))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


__all__ = ["ARCFACE_TEMPLATE_112", "align_face", "similarity_transform", "template_for"]
