"""Precision, memory format, input dtype and the DeepSpeed engine: ONE code path for CPU and GPU.

Why this module exists: before it, precision and memory format were decided behind
``if device.type == "cuda"`` branches that the CPU suite never ran, and the GPU path broke in two
places no test saw (channels_last weights crashed ``deepspeed.initialize``; float32 batches met a
bf16 engine). Here every such decision is made once, from the configuration and a few facts about
the device (:class:`DeviceFacts`, which a test can state for a GPU it does not have), and the
result (:class:`EngineFormat`) is applied the same way on every device. The CPU suite runs the
GPU's configuration (bf16, channels_last) at small size.

Memory format: the backbone's *activations* are channels_last when ``channels_last`` is on; its
*parameters* stay in the default contiguous layout. DeepSpeed broadcasts every parameter as bytes
(``p.data.view(torch.uint8)``, which needs ``stride(-1) == 1``) and ZeRO 1/2 flatten parameters into
one buffer that they alias; a channels_last parameter breaks both. A convolution whose input is
channels_last runs its NHWC kernel (cuDNN and oneDNN choose the format from input *or* weight), so
a channels_last batch gives channels_last activations through the whole network.

bf16 is autocast over a float32 engine (DeepSpeed's ``torch_autocast``): the weights, their
gradients and the optimizer stay float32 and the forward computes in bf16, as arcface_torch does
with fp16. Why not DeepSpeed's ``bf16`` mode: at ZeRO 0 it wraps the optimizer in
FP16_UnfusedOptimizer, whose step works tensor by tensor (overflow check, cast to float32, clip,
copy back): ~1,780 operators per step for r18 (measured, benchmarks/RESULTS.md), each a kernel
launch on a GPU, where the optimizer took 60% of the step. On the float32 engine the optimizer is
one ``foreach`` SGD and clipping one ``foreach`` norm (:func:`clip_gradients`, done by fr_train at
ZeRO 0): ~107. The gradients are all-reduced in bf16 (``communication_data_type``), the bytes of
DeepSpeed's bf16 mode. Memory: float32 weights + gradients + momentum (12 B/parameter) instead of
bf16 weights + bf16 gradients + float32 master + momentum (12-16). fp16 keeps DeepSpeed's
loss-scaled fp16 engine (clipping needs the unscaled gradients it owns).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fr_train.console import log

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST: tuple[str, ...] = ("auto", "true", "false")

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision and memory-format decisions depend on, and nothing else."""

    type: str  # "cuda" or "cpu"
    bf16_supported: bool

    @classmethod
    def of(cls, device: torch.device) -> DeviceFacts:
        if device.type == "cuda":
            return cls("cuda", bool(torch.cuda.is_bf16_supported()))
        return cls(device.type, True)  # CPU bf16 works everywhere (slowly where the ISA lacks it)


@dataclass(frozen=True)
class EngineFormat:
    """The resolved numerics of a run: what the engine computes in and how batches reach it."""

    precision: Precision
    channels_last: bool

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the backbone computes in and its batches arrive in."""
        return _DTYPES[self.precision]

    @property
    def param_dtype(self) -> torch.dtype:
        """The backbone's parameters: float16 under DeepSpeed's fp16 engine, else float32 (bf16 is
        autocast over float32 weights: module docstring)."""
        return torch.float16 if self.precision == "fp16" else torch.float32

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def loader_dtype(self, decodes_on_gpu: bool) -> Literal["float32", "float16"]:
        """What DALI should emit: float16 for an fp16 run decoding on the GPU (half the bytes, no
        cast), else float32 (DALI has no bfloat16 output; :meth:`batch` casts on the device)."""
        return "float16" if self.precision == "fp16" and decodes_on_gpu else "float32"

    def batch(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch in the engine's dtype and memory format on ``device``: one ``.to`` (a no-op where
        it already is so; on the device where the batch already lives there: no host round trip)."""
        return images.to(device=device, dtype=self.dtype, memory_format=self.memory_format, non_blocking=True)

    def frozen_module(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """A module outside DeepSpeed (the distillation teacher) in the same numerics as the engine's
        module; not being broadcast or flattened by DeepSpeed, its weights may be channels_last."""
        module = module.to(device=device, memory_format=self.memory_format)
        for p in module.parameters():  # as DeepSpeed does: parameters cast, BN statistics kept in float32
            p.data = p.data.to(self.dtype)
        return module


def resolve_format(precision: str, channels_last: str, facts: DeviceFacts) -> EngineFormat:
    """``run.precision`` (auto|fp32|bf16|fp16) and ``run.channels_last`` (auto|true|false) for a device.

    auto precision: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU (CPU bf16 is slow:
    it is allowed when asked for, as the tests do). auto channels_last: on CUDA (NHWC tensor-core
    convolutions), not on CPU. fp16 needs CUDA: DeepSpeed's loss-scaled fp16 optimizer is a GPU
    path."""
    if precision not in PRECISIONS:
        raise ValueError(f"run.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if channels_last not in CHANNELS_LAST:
        raise ValueError(f"run.channels_last: {channels_last!r} is not one of {', '.join(CHANNELS_LAST)}")
    on_gpu = facts.type == "cuda"
    if precision == "auto":
        resolved: Precision = ("bf16" if facts.bf16_supported else "fp16") if on_gpu else "fp32"
    else:
        resolved = precision  # type: ignore[assignment]
    if resolved == "fp16" and not on_gpu:
        raise ValueError("run.precision=fp16 needs a CUDA GPU (DeepSpeed's loss-scaled fp16 path); "
                         "use run.precision=bf16 or fp32 on CPU")
    if resolved == "bf16" and not facts.bf16_supported:
        raise ValueError("run.precision=bf16: this GPU has no bfloat16 support; use run.precision=fp16 or auto")
    cl = on_gpu if channels_last == "auto" else channels_last == "true"
    return EngineFormat(resolved, cl)


def deepspeed_config(fmt: EngineFormat, *, micro_batch: int, grad_accum: int, clip_grad_norm: float,
                     zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed config of the backbone's engine (the head is model-parallel, outside it)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        # At ZeRO 0 fr_train clips (clip_gradients: one foreach norm; DeepSpeed's is per tensor).
        "gradient_clipping": 0.0 if clips_outside_deepspeed(fmt, zero_stage) else clip_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        # Our SGD is a plain torch optimizer: DeepSpeed's ZeRO refuses it without this flag.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if fmt.precision == "bf16":  # autocast over a float32 engine (module docstring)
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        ds["communication_data_type"] = "bf16"
    elif fmt.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def clips_outside_deepspeed(fmt: EngineFormat, zero_stage: int) -> bool:
    """Whether fr_train clips the backbone's gradients (:func:`clip_gradients`) instead of DeepSpeed:
    at ZeRO 0 on a float32 engine (fp32, bf16), where the gradients are whole tensors after
    DeepSpeed's all-reduce. ZeRO 1/2 hold them in flat partitions, and fp16's are loss-scaled:
    DeepSpeed clips those."""
    return zero_stage == 0 and fmt.precision != "fp16"


def clip_gradients(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the backbone's gradients to a global L2 norm of ``max_norm`` in one foreach pass; returns
    the norm before clipping (a tensor: no host sync). Call at the accumulation boundary, after
    ``engine.backward`` (the gradients are then the all-reduced ones)."""
    grads = [p for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)


def backbone_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, momentum: float,
                       weight_decay: float) -> torch.optim.Optimizer:
    """One multi-tensor (foreach) update for all of the backbone's parameters: a handful of
    operators per step instead of a handful per tensor."""
    trainable = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, foreach=True)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                 device: torch.device, *, show_prints: bool = False) -> Any:
    """``deepspeed.initialize`` on a module moved to ``device`` with contiguous parameters (see the
    module docstring: DeepSpeed's broadcast and ZeRO's flat buffers need them); DeepSpeed itself
    casts the module to fp16 (bf16 stays float32 under autocast). What DeepSpeed prints meanwhile
    is logged at debug level, or printed as it was with ``show_prints`` (run.ray_log_level INFO)."""
    import deepspeed

    from fr_train.train.build_locks import clear_abandoned_build_locks

    # deepspeed.initialize may JIT-build its CPU communication op under a lock file; a build killed
    # midway (a timeout, a preemption at first start) leaves the lock and every later run would wait
    # on it forever.
    clear_abandoned_build_locks()
    model = model.to(device=device, memory_format=torch.contiguous_format)
    # DeepSpeed print()s each op it loads ("... deepspeed_shm_comm_op built successfully", twice per
    # rank on CPU): kept off the run's console, at debug level in fr_train's log.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
    for line in printed.getvalue().splitlines():
        if show_prints:
            print(line)
        else:
            log.debug(f"deepspeed: {line}")
    return engine


def loss_scale(engine: Any, fmt: EngineFormat) -> float:
    """DeepSpeed's current dynamic loss scale (fp16), 1.0 otherwise."""
    if fmt.precision != "fp16":
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of this rank so far: device memory allocated by torch on CUDA, the process's
    peak resident set on CPU (the figures a user compares runs by)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that step-time parts measure work, not launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
