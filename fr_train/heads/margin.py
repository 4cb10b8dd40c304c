"""Target-logit margins of the combined (insightface) family: ``s·(cos(m1·θ + m2) − m3)``.

Only the target logit of each row carries a margin; every other logit is ``s·cos θ``. The
margin is applied by the distributed cross-entropy to the (few) target cosines, so it works on a
vector of ``B`` values, never on the ``B × S`` logit matrix.

Where ``m1·θ + m2`` leaves ``[0, π]`` the cosine stops decreasing in θ, which would reward a
sample for moving *away* from its prototype. Two extensions keep the target logit monotone:

* ``m1 == 1`` (ArcFace, combined ArcFace+CosFace): insightface's ``easy_margin=False`` rule
  (arcface_torch ``losses.py``, class ``ArcFace``/``CombinedMarginLoss``): with
  ``th = cos(π − m2)``, use ``cos(θ + m2)`` where ``cos θ > th`` (i.e. θ + m2 < π), else
  ``cos θ − m2·sin(m2)`` (their ``sinmm = sin(π − m)·m = m·sin m``). At ``cos θ == th`` the
  fallback is used, as there.
* ``m1 != 1`` (SphereFace, A-Softmax eq. 7, generalised by ``m2``): with ``φ = m1·θ + m2`` and
  ``k = ⌊φ/π⌋``, ``ψ(θ) = (−1)^k·cos φ − 2k``; continuous and monotone decreasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _theta(cos: torch.Tensor) -> torch.Tensor:
    """θ = arccos(cos), clamped just inside [−1, 1] so the derivative stays finite."""
    eps = 1e-12 if cos.dtype == torch.float64 else 1e-6
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


@dataclass(frozen=True)
class CombinedMargin:
    """``s·(cos(m1·θ + m2) − m3)`` on the target logit, ``s·cos θ`` elsewhere.

    ``linear=True`` is the plain softmax head: logits ``x·Wᵀ + b`` with no normalisation of
    x or W, no scale and no margin (s, m1, m2, m3 must then be 1, 1, 0, 0).
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    linear: bool = False

    def __post_init__(self) -> None:
        if not (self.s > 0 and math.isfinite(self.s)):
            raise ValueError(f"CombinedMargin.s must be a positive finite scale, got {self.s}")
        if not self.m1 >= 1.0:
            raise ValueError(f"CombinedMargin.m1 (multiplicative angular margin) must be >= 1, got {self.m1}")
        if not 0.0 <= self.m2 < math.pi:
            raise ValueError(f"CombinedMargin.m2 (additive angular margin) must be in [0, π), got {self.m2}")
        if not self.m3 >= 0.0:
            raise ValueError(f"CombinedMargin.m3 (additive cosine margin) must be >= 0, got {self.m3}")
        if self.linear and (self.s, self.m1, self.m2, self.m3) != (1.0, 1.0, 0.0, 0.0):
            raise ValueError(
                "CombinedMargin(linear=True) is the plain softmax head and takes no scale or margin; "
                f"got s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}. Use CombinedMargin.softmax()."
            )

    # Presets -------------------------------------------------------------------------------------
    @classmethod
    def softmax(cls) -> CombinedMargin:
        """Plain linear classifier with bias (no normalisation, no margin)."""
        return cls(s=1.0, m1=1.0, m2=0.0, m3=0.0, linear=True)

    @classmethod
    def sphereface(cls, m1: float = 1.35, s: float = 64.0) -> CombinedMargin:
        """Multiplicative angular margin with the monotone ψ extension. The default m1=1.35 is the
        value insightface's combined-margin configs use with normalised features (the paper's m=4
        needs its λ-annealing to converge and is available by passing m1=4)."""
        return cls(s=s, m1=m1, m2=0.0, m3=0.0)

    @classmethod
    def arcface(cls, m: float = 0.5, s: float = 64.0) -> CombinedMargin:
        return cls(s=s, m1=1.0, m2=m, m3=0.0)

    @classmethod
    def cosface(cls, m: float = 0.4, s: float = 64.0) -> CombinedMargin:
        return cls(s=s, m1=1.0, m2=0.0, m3=m)

    @classmethod
    def combined(cls, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2, s: float = 64.0) -> CombinedMargin:
        return cls(s=s, m1=m1, m2=m2, m3=m3)

    # Math ----------------------------------------------------------------------------------------
    def target_cos(self, cos: torch.Tensor) -> torch.Tensor:
        """The margin-modified target cosine ``g(cos θ) − m3`` (before the scale s), elementwise."""
        if self.linear:
            return cos
        if self.m1 == 1.0:
            if self.m2 == 0.0:
                g = cos
            else:
                # insightface easy_margin=False: cos(θ+m) where cos θ > cos(π−m), else cos θ − m·sin m.
                th = math.cos(math.pi - self.m2)
                g = torch.where(cos > th, torch.cos(_theta(cos) + self.m2), cos - self.m2 * math.sin(self.m2))
        else:
            # SphereFace ψ (A-Softmax eq. 7) on φ = m1·θ + m2: (−1)^k cos φ − 2k, k = ⌊φ/π⌋.
            phi = self.m1 * _theta(cos) + self.m2
            k = torch.floor(phi.detach() / math.pi)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
            g = sign * torch.cos(phi) - 2.0 * k
        return g - self.m3 if self.m3 else g

    def target_cos_and_slope(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target_cos(c), d target_cos / dc)`` for a vector of target cosines (no graph kept)."""
        with torch.enable_grad():
            c = cos.detach().requires_grad_(True)
            value = self.target_cos(c)
            (slope,) = torch.autograd.grad(value.sum(), c)
        return value.detach(), slope

    def to_dict(self) -> dict[str, float | bool]:
        return {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3, "linear": self.linear}
