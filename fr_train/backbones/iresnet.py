"""iResNet ("IR" improved residual network) backbones for 112×112 face crops.

The "LResNet-E-IR" networks of ArcFace (Deng et al., arXiv:1801.07698, network settings) as trained by
insightface's arcface_torch: a stride-1 3×3 stem ("L", keeps resolution for 112-px crops), improved residual
units BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN with no activation after the residual sum ("IR"),
every stage strided (112 → 56 → 28 → 14 → 7), and output option "E" (BN → dropout → FC → BN1d) that keeps
the 7×7 spatial layout instead of global pooling, because aligned face crops carry identity in position.

Parameter/buffer names intentionally match insightface's `iresnet.py`, so the model zoo's published
`backbone.pth` state dicts load with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fr_train.backbones.norm import BatchNorm1d, BatchNorm2d

#: Blocks per stage (stage widths are always 64, 128, 256, 512).
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}

STAGE_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
INPUT_SIZE = 112
#: Spatial size after the four stride-2 stages: 112 / 2**4.
FINAL_SPATIAL = INPUT_SIZE // 16


def check_image_size(image_size: int, model: str) -> int:
    """Square inputs whose side is a multiple of 16 (four stride-2 stages); 112 is the standard
    face crop, smaller sizes (e.g. 64) make CPU demos and tests affordable."""
    if image_size < 32 or image_size % 16:
        raise ValueError(f"{model}: image_size must be a multiple of 16 and >= 32 (standard: 112), got {image_size}")
    return image_size
BN_EPS = 1e-5


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual block: BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN, plus the shortcut.

    The stride sits on the *second* conv (unlike torchvision's BasicBlock) and nothing follows the
    addition: the next block's leading BN plays the role of the activation's normaliser.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = BatchNorm2d(out_ch, eps=BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            # Projection shortcut: 1×1 conv with the block's stride, then BN (ResNet "option B").
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                BatchNorm2d(out_ch, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """iResNet backbone: N×3×112×112 images normalised to [-1, 1] → N×embedding_size embeddings.

    The embeddings are *not* L2-normalised: the margin heads normalise them, and the norm is kept
    available for quality-aware losses.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        image_size: int = INPUT_SIZE,
    ) -> None:
        super().__init__()
        self.image_size = check_image_size(image_size, "IResNet")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"IResNet needs 4 positive block counts (one per stage), got {list(layers)}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.layers_per_stage = tuple(int(n) for n in layers)
        self.embedding_size = embedding_size

        self.conv1 = _conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_ch = STAGE_WIDTHS[0]
        stages = []
        for width, blocks in zip(STAGE_WIDTHS, self.layers_per_stage, strict=True):
            stage = [IBasicBlock(in_ch, width, stride=2)]
            stage += [IBasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        # Output head ("E" in the paper): BN → dropout → FC over the whole 512×7×7 map → BN1d.
        self.bn2 = BatchNorm2d(STAGE_WIDTHS[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        final = image_size // 16
        self.fc = nn.Linear(STAGE_WIDTHS[-1] * final * final, embedding_size)
        self.features = BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # insightface's initialisation: N(0, 0.1) convs, unit/zero BN, default (Kaiming-uniform) FC.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The final BN1d only centres/shifts: its scale is pinned to 1 and never trained, so the
        # embedding scale is set by the FC alone (insightface freezes `features.weight` the same way).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            # Each residual branch then starts as ~identity (Goyal et al. 2017, §5.1); insightface
            # exposes the same switch (off by default) and zeroes the BN right after the first conv.
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (Skipped while tracing for ONNX export: there the shape is fixed by the example input.)
        size = self.image_size
        if not torch.jit.is_tracing() and (x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size)):
            raise ValueError(
                f"IResNet expects N×3×{size}×{size} images (aligned face crops), got shape "
                f"{tuple(x.shape)}; resize/align the crops to {size}×{size} first"
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        # flatten() follows the logical NCHW order even for channels_last tensors, so the FC sees the
        # same feature order in both memory formats.
        x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))


def iresnet(
    name: str, embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False,
    image_size: int = INPUT_SIZE,
) -> IResNet:
    """Build the named iResNet (`r18`, `r34`, `r50`, `r100`, `r200`)."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown iResNet depth {name!r}; valid: {', '.join(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[name], embedding_size, dropout, zero_init_residual, image_size)
