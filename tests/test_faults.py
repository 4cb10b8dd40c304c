"""A run never hangs on a request the cluster cannot hold, and an error that a restart cannot fix
ends the run after at most one restart with one line that names it, not Ray's traceback.

Issue 14's cases 1 and 4: `--num-workers 3` on a 2-CPU local cluster made Ray wait forever (and
Ctrl-C did not end it); a `--resume` directory that is not a checkpoint was retried
run.max_failures times (4 attempts) and ended in a long Ray traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.failures import is_retryable, nonfinite_again, read_fatal, record_fatal
from cluster.launch import Placement, placeable_workers
from cluster.outcome import ATTEMPTS_NAME, failed_attempts
from cluster.run_owner import clear_launch_records
from fr_train.config import ConfigError
from tests.test_gpu_configuration_on_cpu import TINY
from tests.test_train_e2e import _env

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------
# Units: what fits, what is retried, the record
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("placement", "cpus_per_worker", "nodes", "fit"), [
    (Placement(3, False), 1, [{"CPU": 2.0}], 2),
    (Placement(2, False), 2, [{"CPU": 2.0}, {"CPU": 3.0}], 2),  # each worker on one node: 1 + 1
    (Placement(16, True), 1, [{"CPU": 64.0, "GPU": 8.0}], 8),
    (Placement(2, True), 1, [{"CPU": 0.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 2.0}], 2),  # a head without resources
])
def test_placeable_workers_counts_whole_workers_per_node(placement: Placement, cpus_per_worker: int,
                                                         nodes: list[dict[str, float]], fit: int) -> None:
    assert placeable_workers(placement, cpus_per_worker, nodes) == fit


def test_errors_of_the_input_are_not_retried_crashes_are() -> None:
    from data_pipeline.errors import DataFormatError

    assert not is_retryable(ConfigError("head.s: must be > 0"))
    assert not is_retryable(DataFormatError("train.rec: bad magic"))
    assert not is_retryable(FileNotFoundError("no such checkpoint"))
    assert is_retryable(RuntimeError("NCCL error: unhandled system error"))
    assert is_retryable(MemoryError())
    # Ray tore the process group down under a running loop (a resize): torch's ValueError is no input error
    torn_down = ValueError("Default process group has not been initialized, please make sure to call init_process_group.")
    assert not is_retryable(torn_down)
    assert is_retryable(torn_down, process_group_lost=True)


def test_a_nan_loss_error_survives_pickling_as_ray_sends_it_to_the_controller() -> None:
    """Ray pickles a worker's exception to its TrainController; an exception whose __init__ needs
    more than its message could not be rebuilt there (the run then ended on Ray's traceback)."""
    import pickle

    from fr_train.train.trainer import NonFiniteLossError

    back = pickle.loads(pickle.dumps(NonFiniteLossError("loss is nan at step 7", 7)))
    assert isinstance(back, NonFiniteLossError) and back.step == 7 and str(back) == "loss is nan at step 7"


def test_a_nan_loss_twice_at_one_step_is_fatal(tmp_path: Path) -> None:
    assert not nonfinite_again(tmp_path, 7)  # the first time: a restart from the checkpoint may pass
    assert nonfinite_again(tmp_path, 7)  # the same step after the restart: the data or the settings
    assert not nonfinite_again(tmp_path, 9)
    # One line, the whole message: a first line alone can be a mere heading ("PartialFC.forward: bad input:").
    record_fatal(tmp_path, ValueError("checkpoint x: incompatible:\n  field y differs"), rank=1)
    assert read_fatal(tmp_path) == {"error": "ValueError: checkpoint x: incompatible: field y differs",
                                    "type": "ValueError", "rank": 1}
    clear_launch_records(tmp_path)  # the next launch
    assert read_fatal(tmp_path) is None and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# The real CLI on a real local Ray cluster
# ------------------------------------------------------------------------------------------------
def _fr_train(tmp_path: Path, cache: Path, *args: str, timeout: float = 300) -> tuple[int, str, str, float]:
    """(exit code, stdout + stderr, stdout alone, seconds)."""
    cmd = [str(BIN / "fr_train"), "mbf", "arcface", "--storage", str(tmp_path / "runs"), "--max-steps", "2",
           "--set", f"data.cache_dir={cache}", *[a for s in TINY for a in ("--set", s)],
           "--set", "data.batch_size=8", "--set", "eval.enabled=false", "--set", "run.export_onnx=false", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr, proc.stdout, time.monotonic() - t0


@pytest.mark.slow
def test_more_workers_than_a_local_cluster_holds_is_refused_at_once(tmp_path: Path,
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    rc, out, _, seconds = _fr_train(tmp_path, tmp_path_factory.mktemp("faults_cache"), "--num-workers", "3",
                                 "--name", "too-many", "--set", "run.cpus_per_worker=1", timeout=240)
    assert rc == 1, out[-3000:]
    assert "do not fit this Ray cluster" in out and "--num-workers 2" in out and "cannot grow" in out, out[-3000:]
    assert not (tmp_path / "runs" / "too-many" / "train_log.jsonl").exists()  # no worker started
    print(f"\nrefused in {seconds:.1f} s (local Ray start included)")


def test_a_resume_path_that_is_not_a_checkpoint_is_refused_before_any_worker_starts(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The driver checks a --resume path's manifest before Ray or any worker starts: one line, exit 1,
    in seconds (it took 4 attempts and 80 s, then a Ray traceback, at c0097c5)."""
    not_a_checkpoint = tmp_path / "somewhere"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("mine")
    rc, out, _, seconds = _fr_train(tmp_path, tmp_path_factory.mktemp("faults_cache"), "--num-workers", "1",
                                    "--name", "bad-resume", "--resume", str(not_a_checkpoint), timeout=120)
    assert rc == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("fr_train: error: ") and "is not an fr_train checkpoint" in last, out[-3000:]
    assert str(not_a_checkpoint) in last and "--resume (checkpoint.resume) takes" in last, last  # path and fix
    assert not (tmp_path / "runs" / "bad-resume").exists() and "Ray" not in out  # nothing started
    assert (not_a_checkpoint / "notes.txt").read_text() == "mine"  # what the user pointed at is untouched
    print(f"\nrefused in {seconds:.1f} s with: {last}")


def test_a_batch_larger_than_the_dataset_is_refused_before_ray_starts(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 26: it passed the driver's checks and failed in every worker after Ray started."""
    rc, out, _, seconds = _fr_train(tmp_path, tmp_path_factory.mktemp("faults_cache"), "--num-workers", "2",
                                    "--name", "big-batch", "--set", "data.batch_size=120", timeout=120)
    assert rc == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("fr_train: error: 120 images × 2 ranks × 1 micro-batches"), out[-3000:]
    assert "(192 images): lower data.batch_size or run.grad_accum" in last, last
    assert "Ray" not in out and not (tmp_path / "runs" / "big-batch").exists()  # nothing started, nothing left
    print(f"\nrefused in {seconds:.1f} s with: {last}")


@pytest.mark.parametrize(("width", "property_text", "says"), [
    (16, "3,20,20", "the images are 16x16 (WxH) but the property file says 20x20"),
    (20, "3,16,20", "images are 16x20; the backbones take square crops"),
])
def test_a_property_file_of_another_or_a_non_square_size_is_refused_before_ray_starts(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, width: int, property_text: str, says: str) -> None:
    """Issue 26: both passed the driver and failed in every worker at its first batch."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline.pack import write_insightface_dataset

    def jpeg(seed: int) -> bytes:
        out = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 256, (16, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out, format="JPEG")
        return out.getvalue()

    data = tmp_path / "data"
    write_insightface_dataset(data, [(c, jpeg(10 * c + i)) for c in range(3) for i in range(4)], 3, (16, width))
    (data / "property").write_text(property_text + "\n")
    rc, out, _, _ = _fr_train(tmp_path, tmp_path_factory.mktemp("faults_cache"), "--num-workers", "1",
                              "--name", "bad-size", "--data", str(data), timeout=120)
    last = out.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("fr_train: error: ") and str(data / "property") in last, out[-3000:]
    assert says in last, last
    assert "Ray" not in out and not (tmp_path / "runs" / "bad-size").exists()


@pytest.mark.slow
def test_a_nan_loss_at_the_same_step_twice_fails_once_with_one_line(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An error only a worker can meet: head.s=1e38 (finite, so the config accepts it) overflows the
    loss to inf at the first step; Ray restarts the workers once, the same step is non-finite again,
    and the run ends without more restarts, the last line naming the cause and the fix, not a Ray
    traceback."""
    rc, out, stdout, seconds = _fr_train(tmp_path, tmp_path_factory.mktemp("faults_cache"), "--num-workers", "1",
                                         "--name", "nan", "--set", "head.s=1e38", "--set", "run.max_failures=3",
                                         timeout=600)
    assert rc == 1, out[-3000:]
    last = stdout.strip().splitlines()[-1]  # what the user reads last (Ray's own logs go to stderr)
    assert last.startswith("[fr_train] run nan FAILED (not retried"), out[-3000:]
    assert "NonFiniteLossError: loss is inf at step 0" in last and "optimizer.lr" in last, last
    log = tmp_path / "runs" / "nan" / "train_log.jsonl"
    starts = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "start"]
    assert len(starts) == 2  # the first attempt and one restart: then not retried
    # Ray Train called fr_train's AttemptCounter for each failed attempt (the failure line's count)
    assert failed_attempts(tmp_path / "runs" / "nan" / ATTEMPTS_NAME) == 2
    print(f"\nfailed in {seconds:.1f} s with: {last}")
