"""BatchNorm that normalises in float32 whatever dtype its parameters were cast to.

Why: DeepSpeed's bf16/fp16 modes cast every parameter to the low-precision dtype but leave buffers
(the running statistics) in float32, and PyTorch's batch norm accepts a low-precision input only
with *all* of weight, bias and statistics in one dtype, or all four in float32 ("mixed" batch
norm). A bf16 engine with stock BatchNorm therefore fails at its first forward, on CPU and GPU
alike. Here the affine parameters are up-cast for the call (a per-channel vector: negligible), so
every BN runs as mixed batch norm: statistics kept and accumulated in float32, the activations in
the engine's dtype. In float32 the casts are no-ops and the layer is exactly ``nn.BatchNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class _Float32Stats:
    """The forward of ``nn.modules.batchnorm._BatchNorm`` with float32 affine parameters."""

    frozen_statistics = False  # set by freeze_batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)  # type: ignore[attr-defined]
        momentum = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        training = self.training and not self.frozen_statistics  # type: ignore[attr-defined]
        if training and self.track_running_stats and self.num_batches_tracked is not None:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
        batch_stats = training or (self.running_mean is None and self.running_var is None)  # type: ignore[attr-defined]
        track = not training or self.track_running_stats  # type: ignore[attr-defined]
        return F.batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None,  # type: ignore[attr-defined]
            _f32(self.weight), _f32(self.bias), batch_stats, momentum, self.eps,  # type: ignore[attr-defined]
        )


class BatchNorm2d(_Float32Stats, nn.BatchNorm2d):
    pass


class BatchNorm1d(_Float32Stats, nn.BatchNorm1d):
    pass


def freeze_batch_norm(model: nn.Module) -> int:
    """Every BatchNorm of ``model`` uses (and keeps) its running statistics, in train mode too.
    Returns how many layers were frozen; a model with stock ``nn.BatchNorm`` layers is refused."""
    stock = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _Float32Stats)]
    if stock:
        raise TypeError(f"freeze_batch_norm: {stock[:3]} are stock BatchNorm layers; build the backbone with "
                        "fr_train.backbones.norm's BatchNorm1d/BatchNorm2d")
    layers = [m for m in model.modules() if isinstance(m, _Float32Stats)]
    for m in layers:
        m.frozen_statistics = True
    return len(layers)
