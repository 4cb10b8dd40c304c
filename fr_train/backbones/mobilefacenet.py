"""MobileFaceNet (Chen et al., "MobileFaceNets", CCBR 2018) in insightface arcface_torch's widened variant ("mbf").

Depthwise-separable inverted-residual units (1×1 expand → 3×3 depthwise → 1×1 linear projection) and a
global depthwise conv ("GDC", a 7×7 depthwise conv with no padding) instead of global average pooling:
the GDC learns a different weight per spatial position, which matters for aligned faces.

arcface_torch's variant differs from the paper's table 1: every channel count is doubled (`scale=2`)
while the expansion widths stay 128/256/512, so expansion ratios are 1–2 (paper: 2–4), the embedding is
512-d (paper: 128-d), and the stage depths are (1, 4, 6, 2). With 512-d embeddings it costs 0.4375 GMACs in conv/linear layers on a 112×112 input
(0.445 with BN/PReLU elementwise ops; insightface's README calls it "mobilefacenet-0.45G", a ptflops MAC
count that includes those elementwise ops) and has 2.06 M parameters.

Module nesting mirrors insightface's `mobilefacenet.py` (every unit keeps its ops in `.layers`), so its
published state dicts load with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fr_train.backbones.iresnet import check_image_size
from fr_train.backbones.norm import BatchNorm1d, BatchNorm2d

INPUT_SIZE = 112
GDC_CHANNELS = 512


def _pair(k: int) -> tuple[int, int]:
    return (k, k)


class ConvBNPReLU(nn.Module):
    """conv → BN → PReLU (the non-linear unit)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, _pair(kernel), _pair(stride), _pair(padding), groups=groups, bias=False),
            BatchNorm2d(out_ch),
            nn.PReLU(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvBN(nn.Module):
    """conv → BN with no activation: the linear bottleneck of MobileNetV2, keeping low-dim features intact."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, _pair(kernel), _pair(stride), _pair(padding), groups=groups, bias=False),
            BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthwiseUnit(nn.Module):
    """1×1 expand to `hidden` (PReLU) → 3×3 depthwise (stride, PReLU) → 1×1 linear projection, ± shortcut."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        if residual and (stride != 1 or in_ch != out_ch):
            raise ValueError(
                f"a residual unit needs stride 1 and in_ch == out_ch, got {stride=}, {in_ch=}, {out_ch=}"
            )
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBNPReLU(in_ch, hidden, kernel=1),
            ConvBNPReLU(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            ConvBN(hidden, out_ch, kernel=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStage(nn.Module):
    """`num_units` stride-1 residual depthwise units at constant width."""

    def __init__(self, channels: int, num_units: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthwiseUnit(channels, channels, hidden, stride=1, residual=True) for _ in range(num_units)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDCHead(nn.Module):
    """Global depthwise conv 7×7 (linear) → flatten → FC (no bias) → BN1d: the embedding head."""

    def __init__(self, embedding_size: int, spatial: int = 7) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(GDC_CHANNELS, GDC_CHANNELS, kernel=spatial, groups=GDC_CHANNELS),
            nn.Flatten(1),
            nn.Linear(GDC_CHANNELS, embedding_size, bias=False),
            BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet: N×3×112×112 images in [-1, 1] → N×embedding_size embeddings (not L2-normalised)."""

    def __init__(
        self, embedding_size: int = 512, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2,
        image_size: int = INPUT_SIZE,
    ) -> None:
        super().__init__()
        self.image_size = check_image_size(image_size, "MobileFaceNet")
        if len(blocks) != 4 or any(int(n) < 1 for n in blocks):
            raise ValueError(f"MobileFaceNet needs 4 positive stage depths, got {list(blocks)}")
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.embedding_size = embedding_size
        c1, c2 = 64 * scale, 128 * scale
        # Stem: 112 → 56.
        units: list[nn.Module] = [ConvBNPReLU(3, c1, kernel=3, stride=2, padding=1)]
        if blocks[0] == 1:
            # insightface's single-unit first stage: a grouped 3×3 conv with 64 groups (2 channels each
            # at scale 2), not a pure depthwise conv.
            units.append(ConvBNPReLU(c1, c1, kernel=3, stride=1, padding=1, groups=64))
        else:
            units.append(ResidualStage(c1, blocks[0], hidden=128))
        units += [
            DepthwiseUnit(c1, c1, hidden=128, stride=2, residual=False),  # 56 → 28
            ResidualStage(c1, blocks[1], hidden=128),
            DepthwiseUnit(c1, c2, hidden=256, stride=2, residual=False),  # 28 → 14
            ResidualStage(c2, blocks[2], hidden=256),
            DepthwiseUnit(c2, c2, hidden=512, stride=2, residual=False),  # 14 → 7
            ResidualStage(c2, blocks[3], hidden=256),
        ]
        self.layers = nn.ModuleList(units)
        self.conv_sep = ConvBNPReLU(c2, GDC_CHANNELS, kernel=1)
        self.features = GDCHead(embedding_size, spatial=image_size // 16)
        self._init_weights()

    def _init_weights(self) -> None:
        # As insightface: Kaiming-normal (fan_out, ReLU gain) for convs and the FC; unit/zero BN2d.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (Skipped while tracing for ONNX export: there the shape is fixed by the example input.)
        size = self.image_size
        if not torch.jit.is_tracing() and (x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size)):
            raise ValueError(
                f"MobileFaceNet expects N×3×{size}×{size} images (aligned face crops), got shape "
                f"{tuple(x.shape)}; resize/align the crops to {size}×{size} first"
            )
        for unit in self.layers:
            x = unit(x)
        return self.features(self.conv_sep(x))
