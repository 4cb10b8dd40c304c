"""The run's curves in TensorBoard (issue 25): the events of train_log.jsonl, read back through a real
`tensorboard` server's HTTP data API; a resumed run continues the curve without the points of the
steps it trains again."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.launch import prepare_data
from fr_train.config import TrainConfig, build_config
from tests.distributed import free_port
from tests.test_gpu_configuration_on_cpu import TINY

BIN = Path(sys.executable).parent


def _cfg(storage: Path, cache: Path, steps: int) -> TrainConfig:
    cfg = build_config("mbf", "arcface", overrides=[
        f"run.storage={storage}", "run.name=tb", f"data.cache_dir={cache}", *TINY, "data.batch_size=8",
        "run.export_onnx=false", "checkpoint.every_steps=2", "checkpoint.every_minutes=0", "run.log_every=1",
        f"schedule.max_steps={steps}", "eval.every_steps=0"])
    cfg.data.path = str(prepare_data(cfg))
    return cfg


def _fit(rank: int, world: int, cfg: dict[str, Any]) -> None:
    from fr_train.train.trainer import Trainer

    Trainer(TrainConfig.from_dict(cfg), rank, world, torch.device("cpu")).fit()


def _get(port: int, route: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}/data/{route}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _serve(logdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen([str(BIN / "tensorboard"), "--logdir", str(logdir), "--host", "127.0.0.1", "--port",
                               str(port), "--load_fast", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if "tb/tensorboard" in _get(port, "runs"):
                return server, port
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    raise AssertionError("tensorboard did not list the run within 60 s")


def test_tensorboard_shows_each_step_once_across_a_resume_with_the_logs_values(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.distributed import run_distributed

    cache = tmp_path_factory.mktemp("tb_cache")
    run = tmp_path / "tb"
    # A launch that trained to step 3, its last checkpoint at step 2, killed before it finished ...
    run_distributed(_fit, 1, _cfg(tmp_path, cache, 3).to_dict(), timeout=600)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000000002"]
    shutil.rmtree(run / "final")
    # ... and the next launch, from step 2 to 4: step 3 is trained again.
    run_distributed(_fit, 1, _cfg(tmp_path, cache, 4).to_dict(), timeout=600)
    events = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in events if e["event"] == "train"}  # the last of each step
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 3, 4]
    evals = [(e["step"], e["accuracy"]) for e in events if e["event"] == "eval"]

    server, port = _serve(tmp_path)
    try:
        loss = _get(port, "plugin/scalars/scalars", run="tb/tensorboard", tag="train/loss")
        accuracy = _get(port, "plugin/scalars/scalars", run="tb/tensorboard", tag="eval/synth_val/accuracy")
        text = _get(port, "plugin/text/text", run="tb/tensorboard", tag="config/text_summary")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [int(step) for _, step, _ in loss] == [1, 2, 3, 4]  # once each: the killed launch's step 3 purged
    for _, step, value in loss:
        assert value == pytest.approx(losses[int(step)], rel=1e-6)  # float32 in the event file
    # Evaluations at step 0 and 3 (first launch, step 3 purged with the rest), at 2 and 4 (second launch).
    assert [(int(s), pytest.approx(a, rel=1e-6)) for _, s, a in accuracy] == [(s, a) for s, a in evals if s != 3]
    config = html.unescape(text[-1]["text"])  # TensorBoard renders the markdown to HTML
    assert text[-1]["step"] == 2 and json.loads(config.split("<code>")[1].split("</code>")[0]) == \
        _cfg(tmp_path, cache, 4).to_dict()
