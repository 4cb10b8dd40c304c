"""Step time and peak memory of the sharded head vs an insightface PartialFC_V2-style baseline.

One training step of the head alone (forward + backward + optimizer step) at world size 1,
batch 128, embedding 512, for growing class counts and sample rates 1.0 / 0.3 / 0.1.

Baseline (written here, as arcface_torch's PartialFC_V2 does it): ONE full-shard nn.Parameter
indexed by the sampled rows (autograd gives a dense num_classes × 512 gradient), a random
permutation on the CPU each step, torch.optim.SGD(momentum=0.9, weight_decay=5e-4) over the whole
shard (every row moves every step), ArcFace logits + F.cross_entropy.
Ours: fr_train.heads.PartialFC + its row-sparse SGD (same hyper-parameters).

Memory method: process RSS sampled every 2 ms by a psutil thread; reported = peak RSS during
construction + steps minus RSS before the head was built (tracemalloc does not see torch's
allocator). Everything runs in one process, configurations one after another, freed in between.

    python benchmarks/head.py                       # 10k, 100k, 1M classes (1M: rates < 1 only)
    python benchmarks/head.py --classes 10000 --steps 3
    python benchmarks/head.py --memory              # bytes per class and the largest head that fits
    python benchmarks/head.py --fit-classes 30000000 --rate 0.05 --device cuda   # the 30M claim, measured

``--memory`` (no timing): the head's persistent state in bytes per class, read off the tensors of a
real ``PartialFC`` + its optimizer at a small class count (weight, SGD momentum rows, VPL memory bank
and its timestamps; storage float32 / bfloat16, with and without VPL), next to the baseline's
(weight + momentum + the dense gradient that every backward allocates). Then the
largest class count whose state fits ``--budget-gb`` next to ``--reserve-gb`` of backbone training
memory: from the persistent bytes alone, and adding one step's transient memory (softmax, row
gradient, copies of the sampled rows), measured on CPU as the RSS peak of a step at two class counts
(``--transient-classes`` and half of it, sample rate ``--transient-rate``) and fitted as a fixed part
plus a cost per sampled column, which is then scaled by the sample rate ``--rate``:
``C·(bytes/class + rate·per_sampled) + fixed ≤ budget − reserve``. GB here = 10^9 bytes. Rows ``fr_train_compact``: bf16
weight with the opt-in compact state (``momentum_dtype`` / ``memory_dtype`` = float8_e4m3fn: fp8 rows
+ a float32 scale per row, int32 VPL timestamps; fr_train/heads/compact.py).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from fr_train.heads import CombinedMargin, PartialFC, VPLConfig
from fr_train.heads.compact import FP8


def fixed_malloc_thresholds() -> None:
    """Make glibc return freed large blocks to the OS (fixed mmap threshold), so the RSS of one
    configuration does not hide inside memory cached from the previous one."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 16)
    libc.mallopt(m_trim_threshold, 1 << 16)


class PeakRSS:
    """Peak resident set size of this process while the context is open (sampled)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval_s, 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self._stop.set()
        self._thread.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


class BaselinePartialFCV2:
    """What arcface_torch's PartialFC_V2 does per step, single process (see module docstring)."""

    def __init__(self, num_classes: int, dim: int, sample_rate: float, margin: CombinedMargin) -> None:
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, dim)))
        self.num_classes, self.sample_rate, self.margin = num_classes, sample_rate, margin
        self.num_sample = int(sample_rate * num_classes)
        self.opt = torch.optim.SGD([self.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.sample_rate < 1.0:
            positive = torch.unique(y)
            perm = torch.randperm(self.num_classes)  # on the CPU, every step
            negatives = perm[~torch.isin(perm, positive)][: max(0, self.num_sample - positive.numel())]
            index = torch.cat([positive, negatives]).sort().values
            labels = torch.searchsorted(index, y)
            w = self.weight[index]  # autograd: dense [num_classes, dim] gradient
        else:
            labels, w = y, self.weight
        cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
        target = self.margin.target_cos(cos.gather(1, labels[:, None]))
        logits = cos.scatter(1, labels[:, None], target) * self.margin.s
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()  # after the step, as train_v2.py does: the gradient is one step's transient
        return float(loss.detach())


class Ours:
    def __init__(self, num_classes: int, dim: int, sample_rate: float, margin: CombinedMargin,
                 storage: str = "float32", vpl: bool = False, compact: bool = False) -> None:
        self.head = PartialFC(num_classes, dim, margin, sample_rate=sample_rate, storage_dtype=getattr(torch, storage),
                              vpl=VPLConfig(start_iter=0) if vpl else None, momentum_dtype=FP8 if compact else None,
                              memory_dtype=FP8 if compact and vpl else None)
        # As the Trainer builds it: the optimizer's row state in the storage dtype.
        self.opt = self.head.make_optimizer(0.1, momentum=0.9, weight_decay=5e-4)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = self.head(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()  # after the step, as the Trainer does: the row gradient is one step's transient
        return float(loss.detach())


@dataclass
class Row:
    impl: str
    classes: int
    rate: float
    step_ms: float
    peak_mb: float


def measure(impl: str, cls: type[BaselinePartialFCV2 | Ours], classes: int, rate: float,
            batch: int, dim: int, steps: int) -> Row:
    gen = torch.Generator().manual_seed(0)
    gc.collect()
    with PeakRSS() as mem:
        model = cls(classes, dim, rate, CombinedMargin.arcface())
        times = []
        for i in range(steps + 1):  # first step is warm-up
            x = torch.randn(batch, dim, generator=gen).requires_grad_(True)
            y = torch.randint(0, classes, (batch,), generator=gen)
            t0 = time.perf_counter()
            loss = model.step(x, y)
            if i:
                times.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                raise RuntimeError(f"{impl} produced a non-finite loss at {classes} classes, rate {rate}")
    del model
    gc.collect()
    return Row(impl, classes, rate, 1000 * statistics.median(times), mem.delta_mb)


# ---------------------------------------------------------------------------------------------------
# --memory
# ---------------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def persistent_state(head: PartialFC) -> dict[str, int]:
    """Bytes of every tensor the head keeps from one step to the next, by name: its parameters,
    buffers (VPL bank and timestamps) and its optimizer's per-row state (SGD momentum). Read from the
    module rather than computed, so a tensor added to the head is counted without touching this."""
    parts = {name: _nbytes(t) for name, t in head.named_parameters()}
    parts |= {name: _nbytes(t) for name, t in head.named_buffers()}
    if head.optimizer is not None:
        for param, state in head.optimizer.row_state().items():
            parts |= {f"{param}.{key}": _nbytes(t) for key, t in state.items() if isinstance(t, torch.Tensor)}
    return parts


MEMORY_CONFIGS = tuple((storage, vpl, False) for storage in ("float32", "bfloat16") for vpl in (False, True)) + tuple(
    ("bfloat16", vpl, True) for vpl in (False, True))


def _step_peak_bytes(make: Callable[[], Ours | BaselinePartialFCV2], classes: int, batch: int, dim: int) -> float:
    """RSS peak of one training step over the RSS before it (median of 3, after a first step)."""
    model = make()
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for i in range(4):
        x = torch.randn(batch, dim, generator=gen).requires_grad_(True)
        y = torch.randint(0, classes, (batch,), generator=gen)
        gc.collect()
        with PeakRSS() as mem:
            model.step(x, y)
        if i:
            peaks.append(mem.peak - mem.start)
    del model
    gc.collect()
    return statistics.median(peaks)


def step_transients(make: Callable[[int], Ours | BaselinePartialFCV2], classes: tuple[int, int], rate: float,
                    batch: int, dim: int) -> tuple[float, float]:
    """One step's temporaries as ``fixed + per_sampled × sampled columns``: the RSS peak of a step
    (over the RSS before it) at two class counts, same ``rate``; the slope is the cost of a sampled
    column (its softmax, its row gradient, the copies the head makes of it; plus the sampler's
    per-class draw divided by the rate), the intercept what does not grow with the sample (the
    chunked head's per-chunk temporaries, the batch's buffers). Returns ``(per_sampled, fixed)``."""
    small, large = classes
    peaks = [_step_peak_bytes(functools.partial(make, c), c, batch, dim) for c in (small, large)]
    per_sampled = (peaks[1] - peaks[0]) / (rate * (large - small))
    return per_sampled, max(0.0, peaks[0] - per_sampled * rate * small)


def memory_report(classes: int = 4096, dim: int = 512, rate: float = 0.1, batch: int = 128,
                  budget_gb: float = 80.0, reserve_gb: float = 12.0, transient_classes: int = 800_000,
                  transient_rate: float = 0.5) -> dict[str, Any]:
    """Bytes per class of each configuration and the largest class count that fits (module docstring)."""
    rows: list[dict[str, Any]] = []
    free = budget_gb * 1e9 - reserve_gb * 1e9
    for storage, vpl, compact in MEMORY_CONFIGS:
        parts = persistent_state(Ours(classes, dim, rate, CombinedMargin.arcface(), storage, vpl, compact).head)
        rows.append({"impl": "fr_train_compact" if compact else "fr_train", "storage": storage, "vpl": vpl,
                     "compact": compact, "parts_bytes_per_class":
                     {k: v / classes for k, v in parts.items()}, "bytes_per_class": sum(parts.values()) / classes})
    base = BaselinePartialFCV2(classes, dim, rate, CombinedMargin.arcface())
    base.step(torch.randn(batch, dim), torch.randint(0, classes, (batch,)))  # creates the momentum
    # The dense gradient is allocated by every step's backward (and freed by zero_grad): O(classes),
    # so it is counted here with the state, and taken out of the baseline's per-sampled-column fit below.
    base_parts = {"weight": _nbytes(base.weight), "weight.grad (dense)": _nbytes(base.weight),
                  **{f"weight.{k}": _nbytes(t) for k, t in base.opt.state[base.weight].items()}}
    rows.append({"impl": "baseline_pfc_v2", "storage": "float32", "vpl": False, "compact": False, "parts_bytes_per_class":
                 {k: v / classes for k, v in base_parts.items()}, "bytes_per_class": sum(base_parts.values()) / classes})
    del base
    for row in rows:
        row["max_classes_persistent"] = int(free // row["bytes_per_class"])
        if transient_classes:
            if row["impl"] == "baseline_pfc_v2":
                def make(c: int) -> BaselinePartialFCV2:
                    return BaselinePartialFCV2(c, dim, transient_rate, CombinedMargin.arcface())
            else:
                def make(c: int, r: dict[str, Any] = row) -> Ours:
                    return Ours(c, dim, transient_rate, CombinedMargin.arcface(), r["storage"], r["vpl"], r["compact"])
            per_sampled, fixed = step_transients(make, (transient_classes // 2, transient_classes), transient_rate,
                                                 batch, dim)
            if row["impl"] == "baseline_pfc_v2":
                per_sampled -= row["parts_bytes_per_class"]["weight.grad (dense)"] / transient_rate
            row["transient_bytes_per_sampled_class"] = per_sampled
            row["transient_fixed_bytes"] = fixed
            row["max_classes_with_step"] = int((free - fixed) // (row["bytes_per_class"] + rate * per_sampled))
    return {"benchmark": "head_memory", "device": f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "measured_at_classes": classes, "dim": dim, "rate": rate, "batch": batch,
            "budget_gb": budget_gb, "reserve_gb": reserve_gb, "transient_classes": transient_classes,
            "transient_rate": transient_rate, "gb": "10^9 bytes", "rows": rows}


def fit_check(classes: int, rate: float, batch: int, dim: int, device: str, budget_gb: float, reserve_gb: float,
              steps: int = 3) -> dict[str, Any]:
    """The claim itself, at full size: build the compact VPL head (bf16 weight, fp8 momentum and VPL
    bank; ``fr_train_compact`` with VPL) of ``classes`` on ``device``, run ``steps`` training steps
    (VPL injecting from the first, labels over all classes), and report its peak memory — on CUDA
    what the caching allocator reserved at its peak (``max_memory_reserved``: blocks it holds, used
    or not; construction included) plus what the device had in use before (the CUDA context), on
    CPU the RSS peak over the RSS before — against ``budget − reserve`` (the backbone's share)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    gc.collect()
    context = 0
    if dev.type == "cuda":
        torch.cuda.init()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_reserved(dev)
        free, total = torch.cuda.mem_get_info(dev)
        context = total - free - before  # the CUDA context and anything else on the device
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        head = PartialFC(classes, dim, CombinedMargin.arcface(), sample_rate=rate, storage_dtype=torch.bfloat16,
                         vpl=VPLConfig(start_iter=0), momentum_dtype=FP8, memory_dtype=FP8, device=dev)
        opt = head.make_optimizer(0.1, momentum=0.9, weight_decay=5e-4)
        state = sum(persistent_state(head).values())
        built_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            x = torch.randn(batch, dim, generator=gen, device=dev).requires_grad_(True)
            y = torch.randint(0, classes, (batch,), generator=gen, device=dev)
            t1 = time.perf_counter()
            loss = head(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"fit check: non-finite loss at {classes} classes")
            times.append(time.perf_counter() - t1)
        injected = float(head.last_vpl_injected) if head.last_vpl_injected is not None else 0.0
    peak = (torch.cuda.max_memory_reserved(dev) - before + context) if dev.type == "cuda" else mem.peak - mem.start
    del head, opt
    gc.collect()
    return {"benchmark": "head_fit", "device": str(dev), "classes": classes, "rate": rate, "batch": batch, "dim": dim,
            "state_bytes": state, "state_bytes_per_class": state / classes, "peak_bytes": peak,
            "step_bytes_over_state": peak - state, "budget_gb": budget_gb, "reserve_gb": reserve_gb,
            "fits": peak + reserve_gb * 1e9 <= budget_gb * 1e9, "build_s": built_s,
            "step_s_median": statistics.median(times), "vpl_injected_fraction_last": injected,
            "context_bytes": context,
            "peak_method": ("torch.cuda.max_memory_reserved + the device memory in use before (context)"
                            if dev.type == "cuda" else "RSS peak (psutil, 2 ms)")}


def memory_table(report: dict[str, Any]) -> str:
    rate, transient = report["rate"], bool(report["transient_classes"])
    head = ("| head | storage | VPL | weight | momentum | VPL bank | row scales (fp8) | VPL timestamps | dense grad "
            "| bytes/class | max classes (state only) |")
    if transient:
        head += (f" step transient B/sampled class | step transient fixed MB | max classes (state + step at "
                 f"rate {rate:g}) |")
    lines = [head, "|" + "---|" * (11 + 3 * transient)]
    for r in report["rows"]:
        p = r["parts_bytes_per_class"]
        cells = [p.get("weight", 0), p.get("weight.momentum_buffer", 0), p.get("vpl_memory", 0),
                 p.get("weight.momentum_scale", 0) + p.get("vpl_memory_scale", 0), p.get("vpl_memory_iter", 0),
                 p.get("weight.grad (dense)", 0)]
        line = (f"| {r['impl']} | {r['storage']} | {'yes' if r['vpl'] else 'no'} | "
                + " | ".join(f"{c:g}" if c else "–" for c in cells)
                + f" | {r['bytes_per_class']:g} | {r['max_classes_persistent'] / 1e6:.1f}M |")
        if transient:
            line += (f" {r['transient_bytes_per_sampled_class']:,.0f} | {r['transient_fixed_bytes'] / 2**20:,.0f} |"
                     f" {r['max_classes_with_step'] / 1e6:.1f}M |")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="10000,100000,1000000")
    p.add_argument("--rates", default="1.0,0.3,0.1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dense-max-classes", type=int, default=200_000,
                   help="skip sample_rate 1.0 above this class count (the same dense work for both; minutes on CPU)")
    p.add_argument("--memory", action="store_true", help="bytes per class and the largest head that fits; no timing")
    p.add_argument("--fit-classes", type=int, default=0, help=(
        "build the compact VPL head of this many classes on --device, run 3 steps at --rate, report its peak "
        "memory against --budget-gb minus --reserve-gb (e.g. 30000000 --rate 0.05 --device cuda)"))
    p.add_argument("--device", default="cpu", help="--fit-classes: cpu or cuda")
    p.add_argument("--memory-classes", type=int, default=4096, help="class count the per-class bytes are read at")
    p.add_argument("--rate", type=float, default=0.1, help="--memory: the sample rate of the step's transients")
    p.add_argument("--budget-gb", type=float, default=80.0, help="--memory: device memory, GB (10^9 bytes)")
    p.add_argument("--reserve-gb", type=float, default=12.0, help=(
        "--memory: the backbone's training memory beside the head, GB. Default 12 for r100 at batch 128 in "
        "bf16: 7.3 GB of activations saved for backward (counted on the meta device), ~1 GB of weights, "
        "bf16 copies, gradients and momentum, the rest headroom for backward's transients and the allocator. "
        "Replace with the measured peak of benchmarks/train_step.py --device cuda --rows r100-b128 minus its head"))
    p.add_argument("--transient-classes", type=int, default=800_000,
                   help="--memory: the step's transients are fitted from RSS peaks at this class count and half of "
                        "it (0: skip)")
    p.add_argument("--transient-rate", type=float, default=0.5,
                   help="--memory: sample rate of those two steps (high, so that the sample spans several of the "
                        "head's chunks of 65,536 columns as at 30M classes, while the state fits this machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fixed_malloc_thresholds()
    if args.fit_classes:
        fit = fit_check(args.fit_classes, args.rate, args.batch, args.dim, args.device, args.budget_gb, args.reserve_gb)
        print(f"{fit['classes']:,} classes, rate {fit['rate']:g}, compact VPL head on {fit['device']}: state "
              f"{fit['state_bytes'] / 1e9:.2f} GB ({fit['state_bytes_per_class']:,.0f} B/class), peak "
              f"{fit['peak_bytes'] / 1e9:.2f} GB; + {fit['reserve_gb']:g} GB reserve "
              f"{'fits' if fit['fits'] else 'does NOT fit'} {fit['budget_gb']:g} GB")
        print(json.dumps(fit))
        return
    if args.memory:
        report = memory_report(args.memory_classes, args.dim, args.rate, args.batch, args.budget_gb, args.reserve_gb,
                               args.transient_classes, args.transient_rate)
        print(memory_table(report))
        print(json.dumps(report))
        return
    measure("warmup", Ours, 1000, 0.5, args.batch, args.dim, 1)  # load kernels/allocator pools once
    rows: list[Row] = []
    print(f"{'classes':>9} {'rate':>5} | {'baseline ms':>11} {'ours ms':>9} {'speedup':>7} | "
          f"{'baseline MB':>11} {'ours MB':>9} {'ratio':>6}")
    for classes in (int(c) for c in args.classes.split(",")):
        for rate in (float(r) for r in args.rates.split(",")):
            if rate >= 1.0 and classes > args.dense_max_classes:
                print(f"{classes:>9} {rate:>5.2f} | skipped (--dense-max-classes {args.dense_max_classes})")
                continue
            pair = [measure(impl, cls, classes, rate, args.batch, args.dim, args.steps)
                    for impl, cls in (("baseline_pfc_v2", BaselinePartialFCV2), ("ours", Ours))]
            rows += pair
            b, o = pair
            print(f"{classes:>9} {rate:>5.2f} | {b.step_ms:>11.1f} {o.step_ms:>9.1f} {b.step_ms / o.step_ms:>6.2f}x | "
                  f"{b.peak_mb:>11.0f} {o.peak_mb:>9.0f} {b.peak_mb / max(o.peak_mb, 1e-9):>5.2f}x", flush=True)
    largest = max(r.classes for r in rows)
    ratio = {
        f"rate_{r.rate}": {
            "time_speedup": next(b.step_ms for b in rows if b.impl != "ours" and (b.classes, b.rate) == (r.classes, r.rate)) / r.step_ms,
            "memory_ratio": next(b.peak_mb for b in rows if b.impl != "ours" and (b.classes, b.rate) == (r.classes, r.rate)) / max(r.peak_mb, 1e-9),
        }
        for r in rows if r.impl == "ours" and r.classes == largest
    }
    print(json.dumps({
        "benchmark": "head", "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "torch": torch.__version__, "batch": args.batch, "dim": args.dim, "steps": args.steps,
        "memory_method": "psutil RSS sampled every 2 ms: peak minus RSS before construction",
        "results": [r.__dict__ for r in rows], "largest_classes": largest, "baseline_over_ours_at_largest": ratio,
    }))


if __name__ == "__main__":
    main()
