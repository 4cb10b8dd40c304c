"""The combined margin family on the target logit: formulas, monotone extensions, presets, validation."""

from __future__ import annotations

import math

import pytest
import torch

from fr_train.heads import CombinedMargin
from tests.head_reference import PRESETS, margin_target, ref_margin


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "softmax"])
def test_target_logit_and_slope_match_the_reference_formula(preset: str) -> None:
    """s·(g(cos) − m3) and its derivative equal the plainly written reference on a grid of cosines."""
    m = PRESETS[preset]
    cos = torch.linspace(-0.999, 0.999, 401, dtype=torch.float64)
    value, slope = m.target_cos_and_slope(cos)
    c = cos.clone().requires_grad_(True)
    ref = margin_target(c, ref_margin(m))
    (ref_slope,) = torch.autograd.grad(ref.sum(), c)
    assert torch.allclose(m.s * value, ref.detach(), atol=1e-10)
    assert torch.allclose(m.s * slope, ref_slope, atol=1e-8)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "softmax"])
def test_target_logit_never_increases_with_the_angle(preset: str) -> None:
    """The ArcFace fallback and the SphereFace ψ keep the target logit monotone over θ ∈ [0, π]."""
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    value = PRESETS[preset].target_cos(torch.cos(theta))
    assert (value[1:] - value[:-1] <= 1e-12).all()


def test_arcface_uses_the_insightface_fallback_at_and_beyond_the_threshold() -> None:
    """cos θ > cos(π − m) → cos(θ + m); otherwise cos θ − m·sin m (insightface easy_margin=False)."""
    m = CombinedMargin.arcface(m=0.5)
    th = math.cos(math.pi - 0.5)
    cos = torch.tensor([th + 1e-9, th, th - 0.01], dtype=torch.float64)
    got = m.target_cos(cos)
    assert got[0] == pytest.approx(math.cos(math.acos(th + 1e-9) + 0.5), abs=1e-9)
    assert got[1] == pytest.approx(th - 0.5 * math.sin(0.5), abs=1e-15)
    assert got[2] == pytest.approx(th - 0.01 - 0.5 * math.sin(0.5), abs=1e-15)


def test_sphereface_psi_branches() -> None:
    """ψ(θ) = (−1)^k cos(m1 θ) − 2k on [kπ/m1, (k+1)π/m1] (A-Softmax eq. 7)."""
    m = CombinedMargin.sphereface(m1=4.0)
    for theta, k in [(0.3, 0), (1.0, 1), (2.0, 2), (3.0, 3)]:
        want = (-1) ** k * math.cos(4 * theta) - 2 * k
        assert float(m.target_cos(torch.tensor([math.cos(theta)], dtype=torch.float64))) == pytest.approx(want, abs=1e-9)


def test_presets_have_the_documented_parameters() -> None:
    assert CombinedMargin.arcface() == CombinedMargin(64.0, 1.0, 0.5, 0.0)
    assert CombinedMargin.cosface() == CombinedMargin(64.0, 1.0, 0.0, 0.4)
    assert CombinedMargin.combined() == CombinedMargin(64.0, 1.0, 0.3, 0.2)
    assert CombinedMargin.softmax().linear
    assert CombinedMargin.sphereface().m1 > 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"s": 0.0}, "s"), ({"m1": 0.5}, "m1"), ({"m2": -0.1}, "m2"), ({"m3": -1.0}, "m3"), ({"linear": True}, "softmax")],
)
def test_invalid_margins_are_refused_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CombinedMargin(**kwargs)
