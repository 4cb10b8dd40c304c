"""Backbone registry: name → how to build an image → embedding network.

All backbones take N×3×112×112 aligned face crops normalised to [-1, 1] ((x − 127.5) / 127.5) and return
N×embedding_size un-normalised embeddings. They are plain fp32 modules: precision (bf16/fp16) is DeepSpeed's
job, not the backbone's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fr_train.backbones.iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet
from fr_train.backbones.mobilefacenet import MobileFaceNet

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "build_backbone",
]


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone. `gmacs`/`mparams` are this repo's measured figures (512-d, 112×112)."""

    name: str
    description: str
    builder: Callable[..., nn.Module]
    supports_dropout: bool
    gmacs: float
    mparams: float


def _build_iresnet(name: str) -> Callable[..., nn.Module]:
    def build(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False,
              image_size: int = 112) -> nn.Module:
        return iresnet(
            name, embedding_size=embedding_size, dropout=dropout, zero_init_residual=zero_init_residual,
            image_size=image_size,
        )

    return build


def _build_mbf(embedding_size: int = 512, dropout: float = 0.0, image_size: int = 112) -> nn.Module:
    if dropout != 0.0:
        raise ValueError(
            f"backbone 'mbf' has no dropout layer (insightface's MobileFaceNet has none), got dropout={dropout}; "
            "use dropout=0 or an iResNet backbone"
        )
    return MobileFaceNet(embedding_size=embedding_size, image_size=image_size)


# Costs measured with fr_train.backbones.flops (conv + linear multiply-accumulates, 1×3×112×112 input);
# tests/test_backbones.py checks them, so the table cannot drift from the code.
_IRESNET_COST = {
    "r18": (2.610, 24.03),
    "r34": (4.460, 34.14),
    "r50": (6.309, 43.59),
    "r100": (12.09, 65.16),
    "r200": (23.42, 118.8),
}

BACKBONES: dict[str, BackboneSpec] = {
    **{
        name: BackboneSpec(
            name=name,
            description=f"iResNet-{name[1:]} (ArcFace IR blocks {'/'.join(map(str, layers))}, BN-dropout-FC-BN head)",
            builder=_build_iresnet(name),
            supports_dropout=True,
            gmacs=_IRESNET_COST[name][0],
            mparams=_IRESNET_COST[name][1],
        )
        for name, layers in IRESNET_LAYERS.items()
    },
    "mbf": BackboneSpec(
        name="mbf",
        description="MobileFaceNet, insightface's 2× wide variant (stages 1/4/6/2, GDC head)",
        builder=_build_mbf,
        supports_dropout=False,
        gmacs=0.4375,
        mparams=2.060,
    ),
}


def build_backbone(name: str, embedding_size: int = 512, dropout: float = 0.0, **kwargs: object) -> nn.Module:
    """Build a registered backbone by name (`r18` … `r200`, `mbf`); extra kwargs go to its builder."""
    spec = BACKBONES.get(name)
    if spec is None:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    valid = set(inspect.signature(spec.builder).parameters) - {"embedding_size", "dropout"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f"backbone {name!r} has no option(s) {unknown}; valid options: {sorted(valid) or 'none'}"
        )
    return spec.builder(embedding_size=embedding_size, dropout=dropout, **kwargs)


def square_side(image_size: tuple[int, int], where: object) -> int:
    """The side of a dataset's square images; every backbone here takes square crops. ``where``
    names the file the size came from (a dataset's property file)."""
    height, width = image_size
    if height != width:
        raise ValueError(f"{where}: images are {height}x{width}; the backbones take square crops (e.g. 112x112): "
                         "re-pack with a square size")
    return int(height)
