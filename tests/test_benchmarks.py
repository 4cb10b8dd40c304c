"""The benchmarks still run and report what they claim: the training-step benchmark's smallest quick
configuration end to end (both implementations, operator counts), and ``head.py --memory``'s bytes
per class against the sizes of the head's own tensors.

Why: benchmarks are run rarely and by hand (on a GPU when one is lent); one that broke with a change
of the Trainer or the head would only be found then, at the cost of a device session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_quick_smallest_row_reports_both_implementations(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--device", "cpu", "--quick", "--rows", "r100-b128",
         "--batch", "2", "--warmup", "0", "--steps", "1", "--no-preload", "--json-out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [r["key"] for r in report["rows"]] == ["r100-b128"]
    row = report["rows"][0]
    for impl in ("baseline", "fr_train"):
        r = row[impl]
        for key in ("img_per_s", "step_ms", "forward_ms", "backward_ms", "optimizer_ms", "peak_mb", "last_loss"):
            assert r[key] > 0, (impl, key, r[key])
        assert set(r["ops"]) == {"forward", "backward", "optimizer"}
        assert all(0 < c["top"] <= c["all"] for c in r["ops"].values()), r["ops"]
    assert row["ratio_fr_train_over_baseline"]["img_per_s"] > 0
    assert "| r100-b128 | r18 32px | 2 | fr_train |" in proc.stdout  # the table RESULTS.md records


def test_head_memory_bytes_per_class_are_the_head_tensors_sizes() -> None:
    from benchmarks.head import memory_report
    from fr_train.heads import CombinedMargin, PartialFC, VPLConfig

    classes, dim = 300, 64
    report = memory_report(classes=classes, dim=dim, transient_classes=0, budget_gb=80, reserve_gb=12)
    rows = {(r["impl"], r["storage"], r["vpl"]): r for r in report["rows"]}
    for storage in (torch.float32, torch.bfloat16):
        for vpl in (False, True):
            head = PartialFC(classes, dim, CombinedMargin.arcface(), sample_rate=0.1, storage_dtype=storage,
                             vpl=VPLConfig() if vpl else None)
            opt = head.make_optimizer(0.1)
            tensors = [head.weight, opt.state[head.weight]["momentum_buffer"]]
            if vpl:
                tensors += [head.vpl_memory, head.vpl_memory_iter]
            expected = sum(t.numel() * t.element_size() for t in tensors) / classes
            row = rows[("fr_train", str(storage).removeprefix("torch."), vpl)]
            assert row["bytes_per_class"] == expected
            assert row["max_classes_persistent"] == int(68e9 // expected)
    # The known figures at 64-d: fp32 weight + momentum = 2 × 256 B; VPL adds a bank row and an int64 step.
    assert rows[("fr_train", "float32", False)]["bytes_per_class"] == 512
    assert rows[("fr_train", "bfloat16", True)]["bytes_per_class"] == 3 * 128 + 8
    assert rows[("baseline_pfc_v2", "float32", False)]["bytes_per_class"] == 3 * 256  # weight, momentum, dense grad


def test_checkpoint_benchmark_reports_the_first_and_the_steady_state_stall(tmp_path: Path) -> None:
    """benchmarks/checkpoint.py at its smallest: the first save allocates the host staging buffers, the
    next one reuses them (nothing allocated), and the table RESULTS.md records has both stalls."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "checkpoint.py"), "--classes", "1000", "--backbone", "mbf",
         "--idle-steps", "1", "--root", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    header, row, report = proc.stdout.strip().splitlines()[-3:]
    assert "stall s" in header and "stall 2nd" in header and "sync s" in header
    (r,) = json.loads(report)["results"]
    assert r["classes"] == 1000 and r["bytes"] > 1000 * 512 * 4 * 2  # head rows + momentum, at least
    assert r["first_staged_bytes"] == r["staging_bytes"] > 0 and r["steady_staged_bytes"] == 0
    for key in ("async_stall_s", "steady_stall_s", "async_lost_s", "steady_lost_s", "sync_total_s", "load_total_s"):
        assert r[key] > 0, key
    assert row.split()[0] == "1000"


def test_head_fit_check_builds_the_compact_vpl_head_and_reports_its_peak_against_the_budget() -> None:
    """``benchmarks/head.py --fit-classes`` at a CPU size: 2,060 B of state per class (bf16 weight,
    fp8 + scale momentum and bank, int32 timestamps), VPL injecting, and a peak that holds the state."""
    from benchmarks.head import fit_check

    fit = fit_check(20_000, 0.05, 16, 512, "cpu", budget_gb=80, reserve_gb=12, steps=2)
    assert fit["state_bytes_per_class"] == 2060
    assert fit["vpl_injected_fraction_last"] > 0
    assert fit["peak_bytes"] >= fit["state_bytes"] and fit["fits"]
    tight = fit_check(20_000, 0.05, 16, 512, "cpu", budget_gb=12.01, reserve_gb=12, steps=1)
    assert not tight["fits"], "10 MB beside the reserve cannot hold a 41 MB head"
