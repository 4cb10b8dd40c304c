"""Compute cost of a backbone: multiply-accumulates (MACs) and parameters.

Convention (the two are routinely confused in face-recognition tables):
- 1 MAC = one multiply + one add. `count_macs` counts the MACs of every Conv2d and Linear weight
  (bias additions are not counted). insightface's arcface_torch README and its `flops.py` (ptflops) label
  this number "GFLOPs": r18 2.6, r50 6.3, r100 12.1, r200 23.5, "mobilefacenet-0.45G".
- `count_flops` = 2 × MACs, the convention of `torch.utils.flop_counter.FlopCounterMode` and of
  OpenVINO's model cards (LResNet100E-IR: 24.2115 GFLOPs, 65.132 M params; LResNet34E-IR: 8.934 GFLOPs).
With `include_elementwise=True`, every BatchNorm and PReLU output element adds 1 MAC (an eval-mode BN is a
per-channel multiply-add); residual additions are not modules, so they are never counted.

Counting runs one forward pass with hooks; build the model under `torch.device("meta")` to get the
count of a large backbone without allocating or computing anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_INPUT = (1, 3, 112, 112)

_ELEMENTWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)


def _module_macs(module: nn.Module, output: torch.Tensor, include_elementwise: bool) -> int:
    if isinstance(module, nn.Conv2d):
        # Each output element is a dot product over (C_in / groups) × kH × kW inputs.
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if include_elementwise and isinstance(module, _ELEMENTWISE):
        return output.numel()
    return 0


def count_macs(
    model: nn.Module, input_size: Sequence[int] = DEFAULT_INPUT, include_elementwise: bool = False
) -> int:
    """Multiply-accumulates of one forward pass on a zero input of `input_size` (batch included).

    The model is run in eval mode (so BatchNorm1d accepts batch 1) and its train/eval flags are restored.
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += _module_macs(module, output, include_elementwise)

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_size), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return total


def count_flops(
    model: nn.Module, input_size: Sequence[int] = DEFAULT_INPUT, include_elementwise: bool = False
) -> int:
    """FLOPs = 2 × `count_macs` (one multiply and one add per MAC); see the module docstring."""
    return 2 * count_macs(model, input_size, include_elementwise)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; `trainable_only` skips frozen ones (e.g. iResNet's BN1d scale)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
