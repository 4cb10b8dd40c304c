"""Time and memory of parsing an MXNet ``.idx``: the array parser against the string parser, in one run.

Every rank parses the dataset's index when it opens it; at WebFace42M that is ~44.5M lines (issue 23).
``read_index`` takes the array path on a canonical index (``<digits>\\t<digits>\\n`` lines); the string
parser (``_parse_index_text``, still used for any other index) is the baseline, run on the same file.
Memory is tracemalloc's peak (numpy's buffers and Python's objects), time the median of ``--repeat``.

    python benchmarks/index_parse.py                  # 1M and 4M lines
    python benchmarks/index_parse.py --lines 44500000 # WebFace42M's size (needs ~30 GB for the baseline)

Prints a table and, last, one JSON line with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data_pipeline import idx_text


def write_index(path: Path, lines: int) -> None:
    """A canonical index: keys 0..n-1, offsets of ~5 KB records (what fr_pack writes), cached by name."""
    if path.is_file():
        return
    with open(path, "w", encoding="ascii") as f:
        for lo in range(0, lines, 1 << 20):
            keys = np.arange(lo, min(lo + (1 << 20), lines))
            f.write("".join(f"{k}\t{k * 5231}\n" for k in keys.tolist()))


def string_parser(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    return idx_text._checked_columns(path, idx_text._parse_index_text(path, raw))


def measure(parse: Callable[[Path], tuple[np.ndarray, np.ndarray]], path: Path, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        parse(path)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    result = parse(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fr_train_index_parse")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.lines:
        path = args.cache / f"{n}.idx"
        write_index(path, n)
        for name, parse in (("string parser (baseline)", string_parser), ("read_index (array)", idx_text.read_index)):
            m = measure(parse, path, args.repeat)
            rows.append({"lines": n, "parser": name, **m, "us_per_line": m["seconds"] / n * 1e6,
                         "bytes_per_line": m["peak_bytes"] / n})
    print(f"{'lines':>11} | {'parser':<25} | {'time':>8} | {'µs/line':>7} | {'peak':>9} | {'B/line':>6}")
    for r in rows:
        print(f"{r['lines']:>11,} | {r['parser']:<25} | {r['seconds']:>6.2f} s | {r['us_per_line']:>7.2f} | "
              f"{r['peak_bytes'] / 1e6:>6.0f} MB | {r['bytes_per_line']:>6.0f}")
    print(json.dumps({"benchmark": "index_parse", "date": datetime.date.today().isoformat(),
                      "machine": platform.platform(), "rows": rows}))


if __name__ == "__main__":
    main()
