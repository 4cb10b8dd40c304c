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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)  # type: ignore[attr-defined]
        momentum = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)  # type: ignore[attr-defined]
        track = not self.training or self.track_running_stats  # type: ignore[attr-defined]
        return F.batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None,  # type: ignore[attr-defined]
            _f32(self.weight), _f32(self.bias), batch_stats, momentum, self.eps,  # type: ignore[attr-defined]
        )


class BatchNorm2d(_Float32Stats, nn.BatchNorm2d):
    pass


class BatchNorm1d(_Float32Stats, nn.BatchNorm1d):
    pass
