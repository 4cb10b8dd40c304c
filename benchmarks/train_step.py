"""One whole training step: fr_train's real ``Trainer.train_step`` vs an arcface_torch train_v2-style step.

Both run in one process, on one device, at world size 1 (a gloo process group on CPU, nccl on CUDA),
on the same float32 images already on the device and fresh random labels every step; warm-up steps,
then timed steps (medians). Reported per row and implementation: images/s, the step's parts
(forward / backward / optimizer, each ended by a device synchronisation on CUDA), peak memory,
and the ratio fr_train / baseline; with ``--count-ops`` also the aten operators one step dispatches
in each part (the CPU proxy of per-step launch overhead, see "Operator counts").

fr_train: ``fr_train.train.trainer.Trainer`` built from a config in the GPU's configuration on every device
(``run.precision=bf16``, ``run.channels_last=true``: DeepSpeed bf16 engine, sharded ``PartialFC``
with its row-sparse SGD, gradient clipping at 5), stepped by calling ``train_step`` directly.

Baseline (written here from the description of insightface's arcface_torch ``train_v2.py``; no code
of it is used): the backbone in ``torch.nn.parallel.DistributedDataParallel`` (bucket 16 MB, buffers
not broadcast, unused-parameter search on and a static graph, as train_v2 configures it; on CUDA an
fp16 gradient-compression communication hook); fp16 autocast + ``GradScaler`` on CUDA, bf16 autocast
without a scaler on CPU; a PartialFC-V2-style head: ONE ``nn.Parameter`` of all classes' rows, each
step the batch's classes plus random negatives up to ``rate × classes`` (all rows at rate 1), rows
indexed out of the Parameter (autograd gives a dense all-classes gradient), ArcFace logits
``s·cos`` with ``cos(θ+m)`` on the target (s 64, m 0.5) and cross-entropy; ONE ``torch.optim.SGD``
(momentum 0.9, weight decay 5e-4) over backbone + head, so every row of the head moves every step;
the backbone's gradient clipped at norm 5; ``loss.item()`` every step. Its input stays in the default
(contiguous) memory format, as train_v2's does, unless ``--baseline-channels-last``.

Rows (``--device cuda``; ``--quick`` replaces the first four with small stand-ins that CPUs can run:
r18 at 32×32, batches of 4-8, 1k-100k classes, and has no r50 row: there is no iResNet smaller than
r18 to stand in for r50 beside r18's r100):

    r100-b128          r100, batch 128, 93,431 classes, rate 1.0
    r100-b512          r100, batch 512, 93,431 classes, rate 1.0
    r100-b128-2m       r100, batch 128, 2,059,906 classes, rate 0.1
    r100-b128-big      r100, batch 128, rate 0.1: baseline 7.5M classes (fp32), fr_train 10M classes
                       with VPL and bf16 head storage (what each fits on one 80 GB GPU)
    r50-b128           r50, batch 128, 93,431 classes, rate 1.0

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over construction + steps (everything that
implementation allocated, images included); on CPU the process's peak RSS during construction +
steps minus the RSS before construction (sampled every 2 ms; see benchmarks/head.py).

Operator counts (``--count-ops``; on by default with ``--quick``): one more step after the timed
ones, under ``torch.profiler`` (CPU activity), with ``record_function`` ranges around the three
parts. Counted: ``aten::`` events whose start lies in a part's range, in any thread; "top" = events
with no ``aten::`` ancestor (what Python, DeepSpeed or the autograd engine dispatched), "all" = every
``aten::`` event including those nested in another (decompositions, ``to``→``_to_copy``→``copy_``).
For fr_train the ranges are opened and closed at the three device synchronisations that
``train_step`` already makes between its parts (the boundaries of its ``StepTimes``), by wrapping
that Trainer's ``_sync``: fr_train/train/trainer.py is not modified.

    python benchmarks/train_step.py --device cpu --quick
    python benchmarks/train_step.py --device cpu --quick --rows r100-b128 --batch 2 --warmup 0 --steps 1 --no-preload
    python benchmarks/train_step.py --device cuda --json-out train_step.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:  # run as `python benchmarks/train_step.py` (benchmarks/ on sys.path) or imported as benchmarks.train_step
    from benchmarks.head import PeakRSS, fixed_malloc_thresholds
except ImportError:  # pragma: no cover - depends on how the script is started
    from head import PeakRSS, fixed_malloc_thresholds  # type: ignore[no-redef]

PHASES = ("forward", "backward", "optimizer")
EMBEDDING = 512


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    """One configuration. ``ours_classes``/``vpl``/``storage`` differ from the baseline's only in the
    large-head row, where each implementation runs the largest head it is meant to fit."""

    key: str
    backbone: str
    batch: int
    image_size: int
    classes: int
    rate: float
    ours_classes: int | None = None
    vpl: bool = False
    storage: str = "float32"

    @property
    def fr_train_classes(self) -> int:
        return self.ours_classes or self.classes


_BIG = dict(ours_classes=10_000_000, vpl=True, storage="bfloat16")
FULL_ROWS = (
    RowSpec("r100-b128", "r100", 128, 112, 93_431, 1.0),
    RowSpec("r100-b512", "r100", 512, 112, 93_431, 1.0),
    RowSpec("r100-b128-2m", "r100", 128, 112, 2_059_906, 0.1),
    RowSpec("r100-b128-big", "r100", 128, 112, 7_500_000, 0.1, **_BIG),  # type: ignore[arg-type]
    RowSpec("r50-b128", "r50", 128, 112, 93_431, 1.0),
)
# CPU stand-ins, the same keys: bf16 convolutions on a CPU without AVX-512 are ~10x slower than fp32
# (mbf's depthwise ones far more), so r18 at 32×32 and batches of 4-8 keep a step at seconds.
QUICK_ROWS = (
    RowSpec("r100-b128", "r18", 4, 32, 1_000, 1.0),
    RowSpec("r100-b512", "r18", 8, 32, 1_000, 1.0),
    RowSpec("r100-b128-2m", "r18", 4, 32, 20_000, 0.1),
    RowSpec("r100-b128-big", "r18", 4, 32, 75_000, 0.1, ours_classes=100_000, vpl=True, storage="bfloat16"),
)


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ImplResult:
    impl: str
    classes: int
    img_per_s: float
    step_ms: float
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    peak_mb: float
    start_mb: float
    """Memory before construction (CUDA: allocated; CPU: RSS): what an earlier configuration left."""
    last_loss: float
    ops: dict[str, dict[str, Any]] | None = None


@dataclass
class RowResult:
    spec: RowSpec
    baseline: ImplResult
    fr_train: ImplResult
    ratio: dict[str, float] = field(default_factory=dict)


def _ratios(b: ImplResult, o: ImplResult) -> dict[str, float]:
    """fr_train / baseline: > 1 means fr_train does more images per second (or uses more memory)."""
    out = {"img_per_s": o.img_per_s / b.img_per_s, "peak_memory": o.peak_mb / max(b.peak_mb, 1e-9)}
    if b.ops and o.ops:
        out["ops_top"] = sum(v["top"] for v in o.ops.values()) / max(1, sum(v["top"] for v in b.ops.values()))
    return out


# ----------------------------------------------------------------------------------------------------------
# The baseline: an arcface_torch train_v2-style step
# ----------------------------------------------------------------------------------------------------------
# The baseline's mixed precision, as train_v2 defines it per device: (autocast dtype, GradScaler?).
BASELINE_AMP: dict[str, tuple[torch.dtype, bool]] = {"cuda": (torch.float16, True), "cpu": (torch.bfloat16, False)}


class SampledArcFaceHead(nn.Module):
    """PartialFC-V2-style head at world size 1: every class's row in one Parameter; a step samples the
    batch's classes + random negatives and indexes them out of it (dense gradient of all rows)."""

    def __init__(self, num_classes: int, dim: int, rate: float, device: torch.device, amp_dtype: torch.dtype,
                 s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, dim), device=device))
        self.num_classes, self.num_sample = num_classes, int(rate * num_classes)
        self.amp_dtype, self.s, self.m = amp_dtype, s, m

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.num_sample < self.num_classes:
            positive = torch.unique(labels)
            # Random scores, positives forced to the top: the k best are the positives + random negatives.
            score = torch.rand(self.num_classes, device=labels.device)
            score[positive] = 2.0
            k = max(self.num_sample, positive.numel())
            index = torch.topk(score, k, sorted=False).indices.sort().values
            labels = torch.searchsorted(index, labels)
            weight = weight[index]
        with torch.autocast(embeddings.device.type, dtype=self.amp_dtype):
            cos = F.linear(F.normalize(embeddings), F.normalize(weight))
        cos = cos.float().clamp(-1.0, 1.0)
        theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        logits = cos.scatter(1, labels[:, None], torch.cos(theta + self.m)) * self.s
        return F.cross_entropy(logits, labels)


class BaselineStep:
    """Backbone in DDP + :class:`SampledArcFaceHead` + one SGD over both (module docstring)."""

    def __init__(self, spec: RowSpec, device: torch.device, lr: float, channels_last: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from fr_train.backbones import build_backbone

        self.device = device
        self.amp_dtype, use_scaler = BASELINE_AMP[device.type]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(0)
        backbone = build_backbone(spec.backbone, embedding_size=EMBEDDING, image_size=spec.image_size).to(device)
        self.model = DistributedDataParallel(
            backbone, device_ids=[device.index] if device.index is not None else None, broadcast_buffers=False,
            bucket_cap_mb=16, find_unused_parameters=True)
        if use_scaler:  # on CUDA (fp16): gradients all-reduced in half precision
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

            self.model.register_comm_hook(None, fp16_compress_hook)
        self.model._set_static_graph()
        self.head = SampledArcFaceHead(spec.classes, EMBEDDING, spec.rate, device, self.amp_dtype)
        self.opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": self.head.parameters()}],
                                   lr=lr, momentum=0.9, weight_decay=5e-4)
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def step(self, images: torch.Tensor, labels: torch.Tensor, parts: list[float],
             ranges: PhaseRanges | None = None) -> float:
        """One step; appends the forward/backward/optimizer seconds to ``parts``; returns the loss."""
        marks = ranges or PhaseRanges(None)
        t0 = time.perf_counter()
        marks.start()
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            embeddings = self.model(images.contiguous(memory_format=self.memory_format))
        loss = self.head(embeddings.float(), labels)
        _sync(self.device)
        t1 = time.perf_counter()
        marks.boundary()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        _sync(self.device)
        t2 = time.perf_counter()
        marks.boundary()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=5.0)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()  # train_v2 logs it every step; the one synchronisation its loop makes
        _sync(self.device)
        t3 = time.perf_counter()
        marks.boundary()
        parts += [t1 - t0, t2 - t1, t3 - t2]
        return value

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# fr_train: the real Trainer
# ----------------------------------------------------------------------------------------------------------
class _NoBatches:
    """The Trainer's batch source when the benchmark feeds ``train_step`` itself (fit is never run)."""

    def __len__(self) -> int:
        return 1_000_000

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("benchmarks/train_step.py calls Trainer.train_step directly")

    def reset(self) -> None:
        pass


def _tiny_dataset(directory: Path, num_classes: int, image_size: int) -> Path:
    """A dataset folder that only states the class count and image size (``property``) next to one
    im2rec record: the Trainer sizes its head and backbone from it; the images come from here."""
    from PIL import Image

    from data_pipeline.recordio import IRHeader, RecordWriter, pack_record

    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (127, 127, 127)).save(buf, format="JPEG")
    with RecordWriter(directory / "train.rec", directory / "train.idx") as writer:
        writer.write(0, pack_record(IRHeader(0, 0.0, 0, 0), buf.getvalue()))
    (directory / "property").write_text(f"{num_classes},{image_size},{image_size}\n", encoding="ascii")
    return directory


class FrTrainStep:
    """``Trainer`` in the GPU's configuration, stepped through ``train_step``."""

    def __init__(self, spec: RowSpec, device: torch.device, lr: float, workdir: Path) -> None:
        from fr_train.config import build_config
        from fr_train.train.trainer import Trainer

        data = _tiny_dataset(workdir / f"data-{spec.key}", spec.fr_train_classes, spec.image_size)
        cfg = build_config(spec.backbone, "arcface", overrides=[
            f"data.path={data}", f"data.batch_size={spec.batch}", "run.precision=bf16", "run.channels_last=true",
            f"run.storage={workdir}", f"run.name=train-step-{spec.key}", "run.export_onnx=false",
            "eval.enabled=false", "checkpoint.resume=never", "checkpoint.every_steps=0",
            "checkpoint.every_minutes=0", f"optimizer.lr={lr}", f"optimizer.base_batch={spec.batch}",
            "optimizer.clip_grad_norm=5.0", "schedule.max_steps=1000000", "schedule.warmup_steps=0",
            f"head.sample_rate={spec.rate}", f"head.storage_dtype={spec.storage}",
            f"head.vpl={str(spec.vpl).lower()}", "head.vpl_start_iter=0",  # VPL injects from the first step
        ])
        self.trainer = Trainer(cfg, 0, 1, device, data=_NoBatches())
        self._ranges: PhaseRanges | None = None
        self._boundaries = 0
        plain_sync = self.trainer._sync

        def sync_and_mark() -> None:  # train_step ends each part with one _sync (module docstring)
            plain_sync()
            self._boundaries += 1
            if self._ranges is not None:
                self._ranges.boundary()

        self.trainer._sync = sync_and_mark  # type: ignore[method-assign]

    def step(self, images: torch.Tensor, labels: torch.Tensor, parts: list[float],
             ranges: PhaseRanges | None = None) -> float:
        from fr_train.train.state import StepTimes

        times = StepTimes()
        self._ranges, self._boundaries = ranges, 0
        if ranges is not None:
            ranges.start()
        loss = self.trainer.train_step(images, labels, times, boundary=True)
        self._ranges = None
        if self._boundaries != len(PHASES):
            raise RuntimeError(f"Trainer.train_step synchronised {self._boundaries} times, not {len(PHASES)}: "
                               "its parts changed; update how this benchmark marks them")
        parts += [times.forward, times.backward, times.optimizer]
        return loss

    def close(self) -> None:
        self.trainer.metrics.close(clean=True)
        self.trainer.ckpt.close()


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseRanges:
    """``record_function`` ranges forward → backward → optimizer, opened at ``start`` and moved on at
    each ``boundary``; with ``prefix=None`` it marks nothing (the timed, unprofiled steps)."""

    def __init__(self, prefix: str | None) -> None:
        self.prefix, self.index = prefix, 0
        self._open: AbstractContextManager[Any] | None = None

    def start(self) -> None:
        self.index = 0
        self._enter()

    def boundary(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
        self.index += 1
        if self.index < len(PHASES):
            self._enter()

    def _enter(self) -> None:
        if self.prefix is not None:
            self._open = torch.profiler.record_function(f"{self.prefix}::{PHASES[self.index]}")
            self._open.__enter__()

    def names(self) -> list[str]:
        return [f"{self.prefix}::{p}" for p in PHASES]


def count_ops(prof: torch.profiler.profile, ranges: PhaseRanges) -> dict[str, dict[str, Any]]:
    """aten events per part: by start time inside the part's range (any thread); "top" = no aten ancestor.
    ``top_names``: the most frequent top-level operators of the part, to see where a count comes from."""
    events = prof.events()
    spans = {}
    for e in events:
        if e.name in ranges.names():
            spans[e.name.split("::")[-1]] = (e.time_range.start, e.time_range.end)
    if set(spans) != set(PHASES):
        raise RuntimeError(f"profiled step lacks part ranges: found {sorted(spans)}")
    counts: dict[str, dict[str, Any]] = {p: {"top": 0, "all": 0} for p in PHASES}
    names: dict[str, Counter[str]] = {p: Counter() for p in PHASES}
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        phase = next((p for p, (a, b) in spans.items() if a <= e.time_range.start <= b), None)
        if phase is None:
            continue
        counts[phase]["all"] += 1
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            counts[phase]["top"] += 1
            names[phase][e.name] += 1
    for p in PHASES:
        counts[p]["top_names"] = dict(names[p].most_common(8))
    return counts


class _PeakMemory:
    """Peak memory of what is built and run inside: CUDA's allocator peak, or the process RSS delta."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss = PeakRSS() if device.type != "cuda" else None
        self._start = 0

    def __enter__(self) -> _PeakMemory:
        if self._rss is not None:
            self._rss.__enter__()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rss is not None:
            self._rss.__exit__(*exc)

    @property
    def start_mb(self) -> float:
        return self._rss.start / 2**20 if self._rss is not None else self._start / 2**20

    @property
    def mb(self) -> float:
        if self._rss is not None:
            return self._rss.delta_mb
        return torch.cuda.max_memory_allocated(self.device) / 2**20


def measure(impl: str, build: Callable[[], BaselineStep | FrTrainStep], spec: RowSpec, classes: int,
            device: torch.device, warmup: int, steps: int, ops: bool) -> ImplResult:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gen = torch.Generator(device=device).manual_seed(0)
    step_s: list[float] = []
    parts: list[list[float]] = []
    counts = None
    with _PeakMemory(device) as mem:
        images = torch.randn(spec.batch, 3, spec.image_size, spec.image_size, generator=gen, device=device)
        runner = build()
        loss = float("nan")
        for i in range(warmup + steps):
            labels = torch.randint(0, classes, (spec.batch,), generator=gen, device=device)
            _sync(device)
            t0 = time.perf_counter()
            p: list[float] = []
            loss = runner.step(images, labels, p)
            if i >= warmup:
                step_s.append(time.perf_counter() - t0)
                parts.append(p)
            if not math.isfinite(loss):
                raise RuntimeError(f"{impl} {spec.key}: non-finite loss at step {i}")
        if ops:
            ranges = PhaseRanges(f"bench_{impl}")
            labels = torch.randint(0, classes, (spec.batch,), generator=gen, device=device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                runner.step(images, labels, [], ranges)
            counts = count_ops(prof, ranges)
        runner.close()
        del runner, images
    gc.collect()
    med = [1000 * statistics.median(p[i] for p in parts) for i in range(len(PHASES))]
    step_ms = 1000 * statistics.median(step_s)
    return ImplResult(impl, classes, spec.batch / (step_ms / 1000), step_ms, *med, mem.mb, mem.start_mb, loss, counts)


def _init_process_group(device: torch.device) -> None:
    """World size 1, in this process: DDP and DeepSpeed need a process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    rows = QUICK_ROWS if args.quick else FULL_ROWS
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {r.key for r in rows})
        if unknown:
            raise SystemExit(f"--rows: unknown row(s) {unknown}; rows are {', '.join(r.key for r in rows)}")
        rows = tuple(r for r in rows if r.key in wanted)
    if args.batch:
        rows = tuple(replace(r, batch=args.batch) for r in rows)
    count = args.quick if args.count_ops is None else args.count_ops
    fixed_malloc_thresholds()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
    _init_process_group(device)
    results: list[RowResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fr_train_step_") as tmp:
            workdir = Path(tmp)
            if args.preload:  # libraries, kernels, DeepSpeed's ops: loaded here, not in the first row's figures
                tiny = replace(rows[0], key="warmup", classes=100, ours_classes=None, vpl=False, storage="float32",
                               batch=min(rows[0].batch, 4), image_size=32)
                for build in (lambda: BaselineStep(tiny, device, args.lr, args.baseline_channels_last),
                              lambda: FrTrainStep(tiny, device, args.lr, workdir)):
                    measure("warmup", build, tiny, tiny.classes, device, 0, 1, False)
            for spec in rows:
                b = measure("baseline", lambda s=spec: BaselineStep(s, device, args.lr, args.baseline_channels_last),
                            spec, spec.classes, device, args.warmup, args.steps, count)
                o = measure("fr_train", lambda s=spec: FrTrainStep(s, device, args.lr, workdir),
                            spec, spec.fr_train_classes, device, args.warmup, args.steps, count)
                results.append(RowResult(spec, b, o, _ratios(b, o)))
                print(_row_line(results[-1]), flush=True)
    finally:
        dist.destroy_process_group()
    return _report(args, device, results, count)


def _device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {threads} threads)"


def _report(args: argparse.Namespace, device: torch.device, results: list[RowResult], count: bool) -> dict[str, Any]:
    import deepspeed

    return {
        "benchmark": "train_step", "device": _device_name(device, torch.get_num_threads()),
        "torch": torch.__version__, "deepspeed": deepspeed.__version__, "quick": args.quick,
        "warmup": args.warmup, "steps": args.steps, "lr": args.lr,
        "fr_train_config": "run.precision=bf16, run.channels_last=true (DeepSpeed bf16, PartialFC row-sparse SGD)",
        "baseline_config": (f"DDP, {BASELINE_AMP[device.type][0]} autocast"
                            f"{' + GradScaler + fp16 comm hook' if BASELINE_AMP[device.type][1] else ''}, "
                            f"{'channels_last' if args.baseline_channels_last else 'contiguous'} input, "
                            "one SGD over backbone + all-classes head Parameter"),
        "memory_method": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                          else "psutil RSS sampled every 2 ms: peak minus RSS before construction"),
        "ops_method": ("torch.profiler CPU events 'aten::*' by start time in the part's record_function range; "
                       "top = no aten:: ancestor, all = every aten:: event") if count else None,
        "rows": [{"key": r.spec.key, "spec": asdict(r.spec), "baseline": asdict(r.baseline),
                  "fr_train": asdict(r.fr_train), "ratio_fr_train_over_baseline": r.ratio} for r in results],
    }


def _classes(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k" if n >= 1000 else str(n)


def _row_line(r: RowResult) -> str:
    return (f"[train_step] {r.spec.key}: baseline {r.baseline.img_per_s:.1f} img/s, fr_train "
            f"{r.fr_train.img_per_s:.1f} img/s ({r.ratio['img_per_s']:.2f}x)")


def table(report: dict[str, Any]) -> str:
    """The Markdown tables RESULTS.md records."""
    lines = ["| row | backbone | batch | impl | classes | rate | img/s | step ms | fwd ms | bwd ms | opt ms "
             "| peak MB | img/s ratio | memory ratio |", "|" + "---|" * 14]
    for row in report["rows"]:
        s, ratio = row["spec"], row["ratio_fr_train_over_baseline"]
        for impl in ("baseline", "fr_train"):
            r = row[impl]
            extra = ("VPL, bf16 rows" if impl == "fr_train" and s["vpl"] else "")
            ratios = (f"{ratio['img_per_s']:.2f}× | {ratio['peak_memory']:.2f}×" if impl == "fr_train" else " | ")
            lines.append(
                f"| {row['key']} | {s['backbone']} {s['image_size']}px | {s['batch']} | {impl} | "
                f"{_classes(r['classes'])}{' ' + extra if extra else ''} | {s['rate']:g} | {r['img_per_s']:.1f} | "
                f"{r['step_ms']:.0f} | {r['forward_ms']:.0f} | {r['backward_ms']:.0f} | {r['optimizer_ms']:.0f} | "
                f"{r['peak_mb']:.0f} | {ratios} |")
    if report["ops_method"]:
        lines += ["", "aten operators per step, top-level / all (forward, backward, optimizer):", "",
                  "| row | impl | forward | backward | optimizer | total | top-level ratio |", "|" + "---|" * 7]
        for row in report["rows"]:
            for impl in ("baseline", "fr_train"):
                ops = row[impl]["ops"]
                total_top, total_all = sum(v["top"] for v in ops.values()), sum(v["all"] for v in ops.values())
                ratio = f"{row['ratio_fr_train_over_baseline']['ops_top']:.2f}×" if impl == "fr_train" else ""
                lines.append(f"| {row['key']} | {impl} | " + " | ".join(
                    f"{ops[p]['top']} / {ops[p]['all']}" for p in PHASES) + f" | {total_top} / {total_all} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small CPU-sized stand-ins of the rows (module docstring)")
    p.add_argument("--rows", default="", help="comma-separated row keys (default: all)")
    p.add_argument("--batch", type=int, default=0, help="override every row's batch size (>= 2: BatchNorm)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --quick)")
    p.add_argument("--lr", type=float, default=0.01, help="both implementations' learning rate")
    p.add_argument("--count-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one more step and count aten operators per part (default: on with --quick)")
    p.add_argument("--baseline-channels-last", action="store_true",
                   help="feed the baseline channels_last images (train_v2 does not)")
    p.add_argument("--preload", action=argparse.BooleanOptionalAction, default=True,
                   help="build and step both implementations once at a tiny size before the rows")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    if args.steps is None:
        args.steps = 2 if args.quick else 20
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(table(report))
    print(json.dumps(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
