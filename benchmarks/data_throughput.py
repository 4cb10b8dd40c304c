"""Images/s of the DALI input pipeline against a PIL + torch DataLoader baseline, in the same run.

Both paths read the same insightface-layout ``train.rec`` (written with the project's packer) and
produce the same batches: decode to RGB, random horizontal flip, ``(x − 127.5)/127.5``, NCHW
float32, int64 labels. The baseline is what a plain PyTorch trainer would do: a Dataset reading
records through ``RecordReader``, PIL decode, ``num_workers`` DataLoader processes.

    python benchmarks/data_throughput.py                      # DALI CPU, 2 threads vs 2 workers
    python benchmarks/data_throughput.py --device gpu         # DALI "mixed" (nvJPEG) decode on CUDA:0

Prints a table and, last, one JSON line with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data_pipeline.dali import DaliConfig, DaliFaceIterator
from data_pipeline.dataset import open_dataset
from data_pipeline.pack import write_insightface_dataset


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """Noise plus a few filled shapes: a JPEG about as hard to decode as a face crop of that size."""
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 25, (size, size, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, size - 10, 2))
        x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(out_dir: Path, images: int, classes: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    per_class = np.full(classes, images // classes)
    per_class[: images % classes] += 1
    samples = ((label, synthetic_jpeg(rng, size)) for label in range(classes) for _ in range(per_class[label]))
    return write_insightface_dataset(out_dir, samples, classes, (size, size))


class RecordImageDataset(Dataset):
    """Baseline: one sample = read record → PIL decode → random flip → normalise → CHW tensor."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.seed = seed
        with open_dataset(directory) as ds:
            self.keys = np.array(ds.image_keys)
        self._ds = None  # opened lazily in each worker: an mmap must not cross fork/spawn

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._ds is None:
            self._ds = open_dataset(self.directory)
        label, encoded = self._ds.read_image(int(self.keys[i]))
        with Image.open(io.BytesIO(encoded)) as decoded:
            rgb = np.asarray(decoded.convert("RGB"), dtype=np.float32)
        if torch.rand(()) < 0.5:  # torch's RNG is seeded per worker by the DataLoader
            rgb = rgb[:, ::-1]
        chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return chw.sub_(127.5).div_(127.5), label


@dataclass
class Measurement:
    name: str
    images: int
    seconds: float
    first_batch_s: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DaliPath:
    """The DALI iterator; ``epoch()`` returns (images, seconds) of one full epoch."""

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.name = f"DALI {args.device} ({args.threads} threads)"
        config = DaliConfig(batch_size=args.batch_size, last_batch="drop", device=args.device,
                            device_id=0 if args.device == "gpu" else None, num_threads=args.threads,
                            initial_fill=args.initial_fill, seed=args.seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*sorted by label")
            self.it = DaliFaceIterator(directory, config, rank=0, world_size=1)
        first = next(iter(self.it))  # pipeline build + shuffle-buffer fill + first decode
        self.device = first.images.device
        _sync(self.device)
        self.first_batch_s = time.perf_counter() - start
        for _ in self.it:  # finish the warm-up epoch
            pass

    def epoch(self) -> tuple[int, float]:
        count, begin = 0, time.perf_counter()
        for batch in self.it:
            count += batch.images.shape[0]
        _sync(self.device)
        return count, time.perf_counter() - begin


class BaselinePath:
    """PIL + DataLoader with persistent workers, batches moved to the benchmark's device."""

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.name = f"PIL + DataLoader ({args.workers} workers)"
        self.device = torch.device("cuda", 0) if args.device == "gpu" else torch.device("cpu")
        start = time.perf_counter()
        self.loader = DataLoader(RecordImageDataset(directory, args.seed), batch_size=args.batch_size, shuffle=True,
                                 drop_last=True, num_workers=args.workers, persistent_workers=True,
                                 pin_memory=args.device == "gpu", generator=torch.Generator().manual_seed(args.seed))
        batches = iter(self.loader)
        next(batches)
        self.first_batch_s = time.perf_counter() - start
        for _ in batches:  # finish the warm-up epoch
            pass

    def epoch(self) -> tuple[int, float]:
        count, begin = 0, time.perf_counter()
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, torch.int64, non_blocking=True)
            count += images.shape[0]
        _sync(self.device)
        return count, time.perf_counter() - begin


def measure(paths: list[DaliPath | BaselinePath], epochs: int) -> list[Measurement]:
    """Alternate epochs between the paths so that load from other processes hits both alike."""
    totals = [[0, 0.0] for _ in paths]
    for _ in range(epochs):
        for total, path in zip(totals, paths, strict=True):
            images, seconds = path.epoch()
            total[0] += images
            total[1] += seconds
    return [Measurement(p.name, int(t[0]), float(t[1]), p.first_batch_s) for p, t in zip(paths, totals, strict=True)]


def gpu_problem() -> str | None:
    """Why --device gpu cannot run here, or None."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        from nvidia.dali.backend import GetCUDADeviceCount  # type: ignore[attr-defined]

        if GetCUDADeviceCount() < 1:
            return "DALI sees no CUDA device"
    except ImportError:
        return "NVIDIA DALI is not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=128)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per path (alternating), after a warm-up epoch")
    parser.add_argument("--initial-fill", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="reuse/keep the generated dataset here")
    args = parser.parse_args(argv)

    if args.device == "gpu" and (problem := gpu_problem()) is not None:
        print(f"--device gpu cannot run on this machine: {problem}. Run it on a CUDA host (e.g. an H100); "
              "the CPU comparison runs with --device cpu.", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="fr_data_throughput_") as tmp:
        directory = args.data or Path(tmp) / "data"
        t0 = time.perf_counter()
        if not (directory / "train.rec").is_file():
            make_dataset(directory, args.images, args.classes, args.size, args.seed)
        pack_s = time.perf_counter() - t0
        rec_mb = (directory / "train.rec").stat().st_size / 2**20
        results = measure([DaliPath(directory, args), BaselinePath(directory, args)], args.epochs)

    dali, base = results
    print(f"\n{args.images} JPEGs {args.size}x{args.size} ({rec_mb:.1f} MiB rec, generated+packed in {pack_s:.1f} s), "
          f"batch {args.batch_size}, {args.epochs} alternating epochs timed per path, torch threads {torch.get_num_threads()}")
    print(f"{'path':<32} {'images/s':>10} {'images':>8} {'seconds':>8} {'first batch s':>14}")
    for m in results:
        print(f"{m.name:<32} {m.rate:>10.0f} {m.images:>8d} {m.seconds:>8.2f} {m.first_batch_s:>14.2f}")
    print(f"speed-up DALI / baseline: {dali.rate / base.rate:.2f}x")
    record = {
        "benchmark": "data_throughput",
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "host": platform.node(),
        "gpu": torch.cuda.get_device_name(0) if args.device == "gpu" else None,
        "images": args.images, "size": args.size, "batch_size": args.batch_size, "epochs": args.epochs,
        "dali_threads": args.threads, "baseline_workers": args.workers,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "dali_images_per_s": round(dali.rate, 1), "baseline_images_per_s": round(base.rate, 1),
        "speedup": round(dali.rate / base.rate, 3),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
