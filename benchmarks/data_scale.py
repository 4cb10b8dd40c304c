"""Opening a dataset at WebFace42M scale: time, memory per rank, first batch, seek, reader speed (issue 23).

Writes (once, cached under ``--cache``) insightface-layout datasets of ``--sizes`` images, ~21 per
identity as WebFace42M (42.5M images, 2M identities): a few small valid 112×112 JPEGs repeated, all
records of one size so a chunk of the ``.rec`` is one numpy array (a 5M-image dataset in under a
minute). Then, for each size and sampler, a fresh process plays rank 0 of ``--world`` ranks and does
what a trainer's worker does: open the dataset, build the sampler's iterator, take a batch, seek to
the middle of the epoch (the scheduled samplers), and read batches with decoding (DALI CPU) and
without (the bytes handed to DALI: ``fn.readers.mxnet`` alone for ``shuffle``, the schedule's reads
for ``global`` and ``pk``).

Memory: private (anonymous) memory of the process — what every rank of a node pays again — after
the open, minus that after the imports; the memory-mapped index files are page cache shared by the
ranks of a node, so they count once per node (``file MB``, reported beside). ``B/img`` is the
private increase divided by the images; ``slope B/img`` the increase between two sizes divided by the
images added: constants (DALI's thread pools, buffers) cancel, which is what grows to 42.5M.

Baseline in the same run: DALI's own ``readers.mxnet`` on the same files (the time its pipeline
takes to build and yield a first batch, and its private memory) — the floor of any reader built on
it. ``--code DIR`` measures another checkout (a worktree of an older commit) with the same script.
The one-time preparation (parse the ``.idx``, validate every record for DALI, write the caches) is
the ``prepare`` row: a first open with no cache.

    python benchmarks/data_scale.py                          # 1M and 5M images, all samplers
    python benchmarks/data_scale.py --sizes 42500000         # WebFace42M (~45 GB of disk, by hand)

Prints a table and, last, one JSON line with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZE = 112
IMAGES_PER_IDENTITY = 21.25  # WebFace42M: 42.5M images / 2M identities
MAGIC = 0xCED7230A


# ------------------------------------------------------------------------------------------------
# The datasets
# ------------------------------------------------------------------------------------------------
def _jpegs(count: int = 4) -> list[bytes]:
    """``count`` different valid JPEGs, padded with a COM segment to one length (a record size)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        image = Image.fromarray(np.clip(rng.normal(128, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = (int(v) for v in rng.integers(0, SIZE - 30, 2))
            draw.ellipse([x, y, x + 28, y + 28], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=40)
        out.append(buf.getvalue())
    # record = 8 (part head) + 24 (IRHeader) + JPEG: a multiple of 8 bytes, so rows view as uint64
    length = max(len(j) for j in out) + 4
    length += -(32 + length) % 8
    padded = []
    for j in out:
        pad = length - len(j)  # COM segment: FF FE, 2-byte length (counts itself), comment bytes
        padded.append(j[:2] + b"\xff\xfe" + (pad - 2).to_bytes(2, "big") + b"\0" * (pad - 4) + j[2:])
    return padded


def write_dataset(directory: Path, images: int) -> Path:
    """insightface layout: header record 0, images 1..N sorted by identity, identity records after."""
    from data_pipeline.idx_text import write_index_text

    if (directory / "property").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    classes = max(2, round(images / IMAGES_PER_IDENTITY))
    jpegs = _jpegs()
    record = 32 + len(jpegs[0])
    templates = np.zeros((len(jpegs), record), dtype=np.uint8)
    for t, j in enumerate(jpegs):
        row = np.frombuffer(np.array([MAGIC, record - 8, 0, 0, 0, 0, 0, 0], "<u4").tobytes() + j, np.uint8)
        templates[t] = row
        words = row[8:].view("<u4") if (record - 8) % 4 == 0 else None
        assert words is not None and not (words == MAGIC).any(), "a template holds the RecordIO magic"
    first, end = images + 1, images + 1 + classes
    labels_of = (np.arange(images, dtype=np.int64) * classes) // images  # ~21 images per identity, sorted
    header = np.array([MAGIC, 32, 2, 0, 0, 0, 0, 0], "<u4").tobytes() + np.array([first, end], "<f4").tobytes()
    with open(directory / "train.rec", "wb") as rec:
        rec.write(header)
        chunk = 1 << 18
        for lo in range(0, images, chunk):
            n = min(chunk, images - lo)
            rows = templates[np.arange(lo, lo + n) % len(jpegs)]
            as32, as64 = rows.view("<u4"), rows.view("<u8")
            as32[:, 3] = labels_of[lo:lo + n].astype("<f4").view("<u4")  # IRHeader label (payload byte 4)
            as64[:, 2] = np.arange(lo + 1, lo + n + 1, dtype=np.uint64)  # IRHeader id = key
            rec.write(rows.tobytes())
        starts = np.searchsorted(labels_of, np.arange(classes + 1)) + 1  # key range of each identity
        ids = np.zeros((classes, 10), dtype="<u4")
        ids[:, 0], ids[:, 1], ids[:, 2] = MAGIC, 32, 2
        ids[:, 4:6] = np.arange(first, end, dtype="<u8").view("<u4").reshape(-1, 2)
        ids[:, 8:10] = np.stack([starts[:-1], starts[1:]], axis=1).astype("<f4").view("<u4")
        rec.write(ids.tobytes())
    keys = np.concatenate([[0], np.arange(1, end, dtype=np.int64)])
    offsets = np.concatenate([[0], 40 + np.arange(images, dtype=np.int64) * record,
                              40 + images * record + np.arange(classes, dtype=np.int64) * 40])
    write_index_text(directory / "train.idx", keys, offsets)
    (directory / "property").write_text(f"{classes},{SIZE},{SIZE}\n")
    old = time.time_ns() - 3600 * 10**9  # packed an hour ago, as a real dataset (past the cache's racy window)
    for name in ("train.rec", "train.idx", "property"):
        os.utime(directory / name, ns=(old, old))
    return directory


def remove_caches(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name not in ("train.rec", "train.idx", "property"):
            path.unlink()


# ------------------------------------------------------------------------------------------------
# One rank, in a fresh process
# ------------------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) * 1024
    return out


class AnonPeak:
    """Private memory sampled every 2 ms (the kernel keeps a peak of the whole RSS only)."""

    def __init__(self) -> None:
        self.peak, self._stop = _status()["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status()["RssAnon"])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status()["RssAnon"])


def child(directory: Path, sampler: str, world: int, batch: int, batches: int) -> dict[str, Any]:
    import warnings

    import torch  # noqa: F401 - imported by every worker before it opens the data
    from nvidia.dali import fn, pipeline_def

    from data_pipeline.dali import IMAGE_INDEX_NAME, DaliConfig, DaliFaceIterator
    from data_pipeline.dataset import open_dataset

    warnings.simplefilter("ignore")
    config = DaliConfig(batch_size=batch, last_batch="drop", num_threads=2, seed=1, initial_fill=1024)
    base = _status()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of what follows
    peak = AnonPeak()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"sampler": sampler}
    if sampler == "dali":  # the baseline: DALI's own reader on the prepared image index, nothing of ours
        @pipeline_def(batch_size=batch, num_threads=2, device_id=None)
        def reader() -> Any:
            encoded, labels = fn.readers.mxnet(path=[str(directory / "train.rec")],
                                               index_path=[str(directory / IMAGE_INDEX_NAME)], shard_id=0,
                                               num_shards=world, random_shuffle=True, initial_fill=1024, seed=1)
            return encoded, labels

        pipe = reader()
        pipe.build()
        result["open_s"] = time.perf_counter() - t0
        opened = _status()
        t1 = time.perf_counter()
        pipe.run()
        result["first_batch_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        result["read_img_s"] = batches * batch / (time.perf_counter() - t1)
        num_images = int(next(iter(pipe.reader_meta().values()))["epoch_size"])
    else:
        with open_dataset(directory) as ds:  # what the trainer reads first (classes, image size)
            num_images = len(ds)
        if sampler == "shuffle":
            it: Any = DaliFaceIterator(directory, config, rank=0, world_size=world)
        elif sampler == "global":
            from data_pipeline.scheduled import ScheduledFaceIterator

            it = ScheduledFaceIterator(directory, config, rank=0, world_size=world)
        else:
            from data_pipeline.pk_sampler import PKFaceIterator

            it = PKFaceIterator(directory, config, k=4, rank=0, world_size=world)
        result["open_s"] = time.perf_counter() - t0
        opened = _status()
        t1 = time.perf_counter()
        next(iter(it))
        result["first_batch_s"] = time.perf_counter() - t1
        if sampler != "shuffle":
            t1 = time.perf_counter()
            it.seek(0, (len(it) // 2) * it.global_batch_size)
            next(iter(it))
            result["seek_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            for _ in range(batches):
                it._source()  # the bytes and labels of one micro-batch, as handed to DALI
            result["read_img_s"] = batches * batch / (time.perf_counter() - t1)
            it.seek(0, batch * world)
        else:
            @pipeline_def(batch_size=batch, num_threads=2, device_id=None)
            def reader() -> Any:
                return tuple(fn.readers.mxnet(path=[str(it.index.rec_path)], index_path=[str(it.index.index_path)],
                                              shard_id=0, num_shards=world, random_shuffle=True, initial_fill=1024))

            pipe = reader()
            pipe.build()
            pipe.run()
            t1 = time.perf_counter()
            for _ in range(batches):
                pipe.run()
            result["read_img_s"] = batches * batch / (time.perf_counter() - t1)
            del pipe
        t1 = time.perf_counter()
        for _, _ in zip(range(batches), iter(it), strict=False):
            pass
        result["decode_img_s"] = batches * batch / (time.perf_counter() - t1)
    anon_peak = peak.stop()
    after = _status()
    result.update(images=num_images, private_bytes=opened["RssAnon"] - base["RssAnon"],
                  private_peak_bytes=anon_peak - base["RssAnon"], file_bytes=opened["RssFile"] - base["RssFile"],
                  peak_rss_bytes=after["VmHWM"] - base["VmRSS"])
    return result


def run_child(code: Path, directory: Path, sampler: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(directory), sampler,
               "--world", str(args.world), "--batch", str(args.batch), "--batches", str(args.batches)]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{sampler} on {directory} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--samplers", nargs="+", default=["dali", "shuffle", "global", "pk"],
                        choices=["dali", "shuffle", "global", "pk"])
    parser.add_argument("--world", type=int, default=8, help="ranks the measured rank 0 shares the data with")
    parser.add_argument("--batch", type=int, default=128, help="images per rank and step")
    parser.add_argument("--batches", type=int, default=10, help="batches timed for each reader speed")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fr_train_data_scale"))
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose data_pipeline is measured")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON record here")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "SAMPLER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.world, args.batch, args.batches)))
        return
    sys.path.insert(0, str(ROOT))
    rows = []
    for n in args.sizes:
        directory = args.cache / str(n)
        t0 = time.perf_counter()
        write_dataset(directory, n)
        written = time.perf_counter() - t0
        remove_caches(directory)  # the first open of a fresh copy: parse, validate, write the caches
        prepare = run_child(args.code, directory, "global", args)
        rows.append({**prepare, "sampler": "prepare", "size": n, "write_s": written})
        for sampler in args.samplers:
            rows.append({**run_child(args.code, directory, sampler, args), "size": n})
    by = {(r["size"], r["sampler"]): r for r in rows}
    if len(args.sizes) > 1:
        lo, hi = min(args.sizes), max(args.sizes)
        for sampler in ["prepare", *args.samplers]:
            a, b = by[(lo, sampler)], by[(hi, sampler)]
            b["slope_private_bytes_per_image"] = (b["private_bytes"] - a["private_bytes"]) / (b["images"] - a["images"])
    print(f"{'images':>10} | {'sampler':<8} | {'open s':>6} | {'first s':>7} | {'seek s':>6} | {'read img/s':>10} | "
          f"{'decode img/s':>12} | {'private MB':>10} | {'peak MB':>7} | {'file MB':>7} | {'B/img':>5} | "
          f"{'slope B/img':>11}")
    for r in rows:
        def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            return format(r[key], fmt) if key in r else "—"
        print(f"{r['images']:>10,} | {r['sampler']:<8} | {f('open_s', '6.2f')} | {f('first_batch_s', '7.2f')} | "
              f"{f('seek_s', '6.3f'):>6} | {f('read_img_s', '10,.0f'):>10} | {f('decode_img_s', '12,.0f'):>12} | "
              f"{r['private_bytes'] / 2**20:10.0f} | {r['private_peak_bytes'] / 2**20:7.0f} | "
              f"{r['file_bytes'] / 2**20:7.0f} | {r['private_bytes'] / r['images']:5.0f} | "
              f"{f('slope_private_bytes_per_image', '11.1f'):>11}")
    record = {"benchmark": "data_scale", "date": datetime.date.today().isoformat(), "machine": platform.node(),
              "cpus": os.cpu_count(), "code": str(args.code), "world": args.world, "batch": args.batch, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
