"""Test support for the monitoring stack: start the REAL Prometheus and Pushgateway binaries on free
local ports with the project's own ops/ configuration (derived into a test copy with short
intervals), query their HTTP APIs, and drive `fr_train.metrics.RunMetrics` from a short real
training loop.

Binaries come from `scripts/install_monitoring.sh` (Debian packages). Where they are missing the
tests skip, except under CI (env CI=true), where a missing binary is a failure: the CI test script
installs them first, so a skip there would hide a broken setup.

`TRAINING_JOB` is the hook that produces the metrics: today a tiny torch job (real model, real
Partial-FC head with VPL, real fp16-style loss scaling, real checkpoints and a restart) run
in-process; swap in the real fr_train job once it can run here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fr_train.metrics import RunMetrics
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
OPS_PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
OPS_ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
OPS_DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "fr_train.json"
INSTALL_HINT = "run `bash scripts/install_monitoring.sh` (installs the Debian packages prometheus and prometheus-pushgateway)"

SCRAPE_INTERVAL_S = 1
STALL_AFTER_S = 3
"""The stalled-run alert's 600 s threshold becomes this in the test rules."""


# ---------------------------------------------------------------------------------------------- binaries
def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def monitoring_binaries() -> dict[str, str]:
    """Paths of prometheus, promtool and the pushgateway; skip (or fail under CI) when missing."""
    found = {
        "prometheus": shutil.which("prometheus"),
        "promtool": shutil.which("promtool"),
        "pushgateway": shutil.which("prometheus-pushgateway") or shutil.which("pushgateway"),
    }
    missing = [name for name, path in found.items() if path is None]
    if missing:
        msg = f"monitoring binaries not on PATH: {', '.join(missing)}; {INSTALL_HINT}"
        if _in_ci():
            pytest.fail(f"CI=true but {msg}")
        pytest.skip(msg)
    return {k: v for k, v in found.items() if v is not None}


# ---------------------------------------------------------------------------------------------- HTTP
def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def _get_json(url: str) -> Any:
    return json.loads(http_get(url))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


@dataclass
class PrometheusAPI:
    url: str

    def _api(self, path: str, **params: Any) -> Any:
        q = urllib.parse.urlencode(params)
        try:
            body = _get_json(f"{self.url}/api/v1/{path}?{q}")
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; say which and why
            raise ValueError(f"Prometheus {path} {params}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        if body.get("status") != "success":
            raise ValueError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the vector (a scalar result comes back as one sample without labels)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")["result"]

    def value(self, expr: str) -> float:
        """The single value of an instant query (fails when it returns no series or several)."""
        result = self.query(expr)
        if len(result) != 1:
            raise AssertionError(f"{expr!r} returned {len(result)} series, expected 1: {result}")
        return float(result[0]["value"][1])

    def label_values(self, label: str, match: str) -> list[str]:
        return self._api(f"label/{label}/values", **{"match[]": match})

    def alerts(self) -> list[dict[str, Any]]:
        return self._api("alerts")["alerts"]

    def targets(self) -> list[dict[str, Any]]:
        return self._api("targets")["activeTargets"]


# ---------------------------------------------------------------------------------------------- configs
def _scrape_job(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    for job in cfg.get("scrape_configs", []):
        if job.get("job_name") == name:
            return job
    raise AssertionError(f"{OPS_PROMETHEUS}: no scrape job named {name!r}")


def derive_test_prometheus_config(
    ops_cfg: dict[str, Any], *, pushgateway: str, workers_sd: Path, gpus_sd: Path, ray_sd: Path, rules: Path,
    prometheus: str,
) -> dict[str, Any]:
    """The ops config with local targets and 1 s intervals: same jobs, same options, so what is
    tested is what ships."""
    cfg = json.loads(json.dumps(ops_cfg))  # deep copy
    cfg["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    cfg["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S}s"
    cfg["rule_files"] = [str(rules)]
    _scrape_job(cfg, "pushgateway")["static_configs"] = [{"targets": [pushgateway]}]
    _scrape_job(cfg, "fr_train_workers")["file_sd_configs"] = [{"files": [str(workers_sd)], "refresh_interval": "1s"}]
    _scrape_job(cfg, "dcgm")["file_sd_configs"] = [{"files": [str(gpus_sd)], "refresh_interval": "1s"}]
    _scrape_job(cfg, "ray")["file_sd_configs"] = [{"files": [str(ray_sd)], "refresh_interval": "1s"}]
    _scrape_job(cfg, "prometheus")["static_configs"] = [{"targets": [prometheus]}]
    return cfg


def derive_test_rules(ops_rules: dict[str, Any], stall_after_s: float) -> dict[str, Any]:
    """The ops rules with the stalled-run window shortened from 600 s to ``stall_after_s``."""
    rules = json.loads(json.dumps(ops_rules))
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "FrTrainRunStalled":
                expr = rule["expr"]
                if expr.count("> 600") != 1:
                    raise AssertionError(f"{OPS_ALERTS}: FrTrainRunStalled no longer compares against '> 600': {expr}")
                rule["expr"] = expr.replace("> 600", f"> {stall_after_s:g}")
                rule.pop("for", None)
                return rules
    raise AssertionError(f"{OPS_ALERTS}: no FrTrainRunStalled rule")


def alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


# ---------------------------------------------------------------------------------------------- servers
@dataclass
class _Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _start(name: str, argv: list[str], log: Path, ready_url: str, timeout: float = 30.0) -> _Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    p = _Process(name, proc, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}: {' '.join(argv)}\n{p.tail()}")
        try:
            return http_get(ready_url, timeout=1.0) is not None
        except (OSError, urllib.error.URLError):
            return False

    try:
        wait_until(ready, timeout, f"{name} to be ready at {ready_url}")
    except AssertionError:
        p.stop()
        raise
    return p


def _write_file_sd(path: Path, groups: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)  # atomic, so Prometheus never reads half a file


@dataclass
class MonitoringStack:
    """A running Pushgateway + Prometheus pair on 127.0.0.1 using the test copy of ops/."""

    pushgateway_url: str
    prometheus: PrometheusAPI
    config_path: Path
    rules_path: Path
    workers_sd: Path
    gpus_sd: Path
    promtool: str
    rules: dict[str, Any]
    processes: list[_Process] = field(default_factory=list)

    def set_worker_targets(self, targets: list[str]) -> None:
        """Workers serving /metrics themselves, as the ops file_sd file lists them."""
        _write_file_sd(self.workers_sd, [{"targets": targets}])

    def set_gpu_targets(self, groups: list[dict[str, Any]]) -> None:
        """dcgm-exporter endpoints, as ops/prometheus/gpus.json lists them (file_sd target groups)."""
        _write_file_sd(self.gpus_sd, groups)

    def pushgateway_groups(self) -> list[dict[str, str]]:
        """Grouping labels of every group the Pushgateway holds."""
        body = _get_json(f"{self.pushgateway_url}/api/v1/metrics")
        return [g["labels"] for g in body["data"]]

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


def start_monitoring_stack(workdir: Path) -> MonitoringStack:
    bins = monitoring_binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    pg_port, prom_port = free_port(), free_port()
    pg_addr, prom_addr = f"127.0.0.1:{pg_port}", f"127.0.0.1:{prom_port}"
    processes: list[_Process] = []
    try:
        processes.append(_start(
            "pushgateway",
            [bins["pushgateway"], f"--web.listen-address={pg_addr}", "--persistence.file=", "--log.level=warn"],
            workdir / "pushgateway.log", f"http://{pg_addr}/-/ready",
        ))
        rules = derive_test_rules(yaml.safe_load(OPS_ALERTS.read_text()), STALL_AFTER_S)
        rules_path = workdir / "alerts.test.yml"
        rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
        workers_sd, gpus_sd, ray_sd = workdir / "workers.json", workdir / "gpus.json", workdir / "ray_sd.json"
        for sd in (workers_sd, gpus_sd, ray_sd):
            sd.write_text("[]")
        cfg = derive_test_prometheus_config(
            yaml.safe_load(OPS_PROMETHEUS.read_text()), pushgateway=pg_addr, workers_sd=workers_sd,
            gpus_sd=gpus_sd, ray_sd=ray_sd, rules=rules_path, prometheus=prom_addr,
        )
        config_path = workdir / "prometheus.test.yml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        processes.append(_start(
            "prometheus",
            [bins["prometheus"], f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={prom_addr}", "--log.level=warn"],
            workdir / "prometheus.log", f"http://{prom_addr}/-/ready",
        ))
        prom = PrometheusAPI(f"http://{prom_addr}")
        # Prometheus hands discovered targets to the scrapers at most every 5 s: wait for the first
        # scrape of the Pushgateway, so a run pushed from now on is scraped from its start.
        wait_until(lambda: any(t["labels"]["job"] == "pushgateway" and t["health"] == "up" for t in prom.targets()),
                   30, "Prometheus to scrape the Pushgateway")
    except BaseException:
        for p in reversed(processes):
            p.stop()
        raise
    return MonitoringStack(
        pushgateway_url=f"http://{pg_addr}", prometheus=prom,
        config_path=config_path, rules_path=rules_path, workers_sd=workers_sd, gpus_sd=gpus_sd, promtool=bins["promtool"],
        rules=rules, processes=processes,
    )


@pytest.fixture(scope="module")
def monitoring_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitoringStack]:
    """Prometheus + Pushgateway for the tests of one module, stopped afterwards."""
    stack = start_monitoring_stack(tmp_path_factory.mktemp("monitoring"))
    try:
        yield stack
    finally:
        stack.stop()


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class JobSummary:
    """What the job did, to check the metrics that arrived against."""

    run: str
    steps: int
    """Global step reached at the end."""
    step_calls: int
    """observe_step calls (steps re-done after the restart included)."""
    epoch: int
    samples_seen: int
    batch_size: int
    num_classes: int
    checkpoints_ok: int
    checkpoints_failed: int
    restarts: int
    resumes: int
    skipped_steps: int
    eval_sets: list[str]
    tar_fars: list[float]
    started_at: float
    last_step_at: float


def train_tiny_job(metrics: RunMetrics, workdir: Path, *, min_steps: int = 30, min_seconds: float = 4.0,
                   batch_size: int = 32, num_classes: int = 40, checkpoint_every: int = 8) -> JobSummary:
    """A short real training job reporting to ``metrics`` as fr_train's worker does.

    Real parts: an MLP backbone on 3×16×16 images of class-dependent random patterns, fr_train's
    Partial-FC head (ArcFace, sample rate 0.5, VPL from step 3), SGD with torch's dynamic loss
    scaler (started at 2**126 so the first steps overflow and are skipped, as fp16 runs do),
    gradient clipping, verification with fr_train.evaluation on two pair sets, checkpoints written
    with torch.save every ``checkpoint_every`` steps (one written to a missing directory fails), and
    one worker failure at step 12 recovered by reloading the last good checkpoint (a restart and a
    resume). Runs at least ``min_steps`` steps and ``min_seconds`` seconds so Prometheus scrapes the
    run several times.
    """
    import numpy as np
    import torch
    from torch import nn

    from fr_train.evaluation.ijb_scoring import identification
    from fr_train.evaluation.verification import evaluate_embeddings, l2_normalize
    from fr_train.heads import CombinedMargin, PartialFC, VPLConfig
    from fr_train.heads.vpl import NEVER_WRITTEN

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dim_in, emb = 3 * 16 * 16, 32
    centers = torch.randn(num_classes, dim_in, generator=gen)
    n_train = num_classes * 6  # 240 images: 7 full batches per epoch (last short batch dropped)
    train_y = torch.arange(num_classes).repeat_interleave(6)
    train_x = centers[train_y] + 0.8 * torch.randn(n_train, dim_in, generator=gen)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_x.view(-1, 3, 16, 16), train_y),
        batch_size=batch_size, shuffle=True, drop_last=True, generator=gen,
    )

    def pair_set(noise: float, n_pairs: int = 40) -> tuple[torch.Tensor, np.ndarray]:
        cls = torch.randint(0, num_classes, (n_pairs, 2), generator=gen)
        cls[: n_pairs // 2, 1] = cls[: n_pairs // 2, 0]  # first half genuine pairs
        issame = (cls[:, 0] == cls[:, 1]).numpy()
        x = centers[cls.reshape(-1)] + noise * torch.randn(2 * n_pairs, dim_in, generator=gen)
        return x.view(-1, 3, 16, 16), issame

    eval_sets = {"synth_easy": pair_set(0.5), "synth_hard": pair_set(1.5)}
    tar_fars = [0.05, 0.1]
    # 1:N search as eval.ijb reports it (fr_train/evaluation/ijb_scoring.py): one gallery template per
    # class, two probes per class, ten classes enrolled in neither gallery (TPIR's non-mated searches).
    search_y = torch.arange(num_classes).repeat(3)
    search_x = (centers[search_y] + 0.8 * torch.randn(len(search_y), dim_in, generator=gen)).view(-1, 3, 16, 16)

    def build() -> tuple[nn.Module, PartialFC, torch.optim.Optimizer, torch.amp.GradScaler]:
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(dim_in, 128), nn.PReLU(128), nn.Linear(128, emb))
        head = PartialFC(num_classes, emb, CombinedMargin.arcface(m=0.3, s=16.0), sample_rate=0.5,
                         vpl=VPLConfig(lambda_=0.15, delta_t=10, start_iter=3), seed=1)
        # Head rows get sparse gradients (sampling): torch SGD takes them without weight decay.
        opt = torch.optim.SGD([{"params": backbone.parameters(), "weight_decay": 5e-4},
                               {"params": head.parameters(), "weight_decay": 0.0}], lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, growth_interval=1000)
        return backbone, head, opt, scaler

    backbone, head, opt, scaler = build()
    ckpt_dir = workdir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_good: Path | None = None
    step = epoch = samples = calls = skipped = 0
    ckpt_ok = ckpt_failed = restarts = resumes = 0
    failed_once = crashed_once = False
    started = time.time()
    # As rank 0 of an elastic run of up to 2 ranks that started on 1 after losing a node.
    metrics.observe_size(2, {"shrink": 1}, below_max_since=started, alert_after_s=1800.0)
    last_step_at = started
    window_t, window_images = time.perf_counter(), 0

    def save_checkpoint(path: Path) -> None:
        nonlocal ckpt_ok, ckpt_failed, last_good
        t0 = time.perf_counter()
        ok = True
        try:
            torch.save({"step": step, "epoch": epoch, "samples": samples, "backbone": backbone.state_dict(),
                        "head_weight": head.weight.detach().clone(), "vpl_memory": head.vpl_memory.clone(),
                        "vpl_memory_iter": head.vpl_memory_iter.clone(), "head_iteration": head.iteration,
                        "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}, path)
            torch.load(path, weights_only=True)  # verify it reads back before calling it good
        except (OSError, RuntimeError):  # torch reports a missing directory as RuntimeError
            ok = False
        dt = time.perf_counter() - t0
        metrics.observe_checkpoint(write_s=dt, stall_s=dt, ok=ok)  # synchronous save: the loop waits it all
        if ok:
            ckpt_ok += 1
            last_good = path
        else:
            ckpt_failed += 1

    def evaluate() -> None:
        backbone.eval()
        with torch.no_grad():
            for name, (x, issame) in eval_sets.items():
                e = l2_normalize(backbone(x).double().numpy())
                r = evaluate_embeddings(e, issame, n_folds=4, tar_fars=tar_fars)
                metrics.observe_eval(name, r.accuracy, r.tar_at_far)
            e = l2_normalize(backbone(search_x).double().numpy())
            y = search_y.numpy()
            gallery = (np.arange(len(y)) < num_classes) & (y >= 10)
            found = identification(e[gallery], y[gallery], e[~gallery], y[~gallery])
            metrics.observe_ijb({"set": "synth_search", "protocol": "1:N", "rank1": found["rank"][1],
                                 "rank5": found["rank"][5], "rank10": found["rank"][10],
                                 "tpir_at_fpir": found["tpir_at_fpir"]})
        backbone.train()

    while step < min_steps or time.time() - started < min_seconds:
        it = iter(loader)
        while True:
            t_data = time.perf_counter()
            try:
                images, labels = next(it)
            except StopIteration:
                epoch += 1
                break
            t0 = time.perf_counter()
            if step == 12 and not crashed_once and last_good is not None:
                # A worker failure: the restarted worker reloads the last good checkpoint.
                crashed_once = True
                backbone, head, opt, scaler = build()
                state = torch.load(last_good, weights_only=True)
                backbone.load_state_dict(state["backbone"])
                with torch.no_grad():
                    head.weight.copy_(state["head_weight"])
                    head.vpl_memory.copy_(state["vpl_memory"])
                    head.vpl_memory_iter.copy_(state["vpl_memory_iter"])
                head.iteration = state["head_iteration"]
                opt.load_state_dict(state["optimizer"])
                scaler.load_state_dict(state["scaler"])
                step, epoch, samples = state["step"], state["epoch"], state["samples"]
                metrics.mark_restart()
                metrics.mark_resume()
                restarts += 1
                resumes += 1
                break
            memory_iter_before = head.vpl_memory_iter.clone()
            emb_out = backbone(images)
            loss = head(emb_out, labels)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            t2 = time.perf_counter()
            scaler.unscale_(opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0))
            scale_before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale_before:  # the scaler found inf/NaN and skipped the step
                skipped += 1
            t3 = time.perf_counter()
            step += 1
            samples += batch_size
            window_images += batch_size
            calls += 1
            # VPL fraction: sampled rows whose memory was fresh before this step wrote it (vpl.inject).
            sampled = head.last_sampled_classes - head.class_start
            t_mem = memory_iter_before[sampled]
            fresh = (t_mem != NEVER_WRITTEN) & (head.iteration - t_mem <= head.vpl.delta_t) & (head.iteration > head.vpl.start_iter)
            elapsed = max(time.perf_counter() - window_t, 1e-9)
            ips = window_images / elapsed
            metrics.observe_step(
                step=step, epoch=epoch, loss=float(loss.detach()), lr=opt.param_groups[0]["lr"],
                images_per_s_rank=ips, images_per_s_global=ips, samples_seen=samples,
                data_s=t0 - t_data, forward_s=t1 - t0, backward_s=t2 - t1, optimizer_s=t3 - t2, step_s=t3 - t_data,
                grad_norm=grad_norm, loss_scale=scaler.get_scale(), skipped_steps=skipped,
                sampled_classes=int(sampled.numel()), vpl_injected_fraction=float(fresh.double().mean()),
            )
            last_step_at = time.time()
            if step % 5 == 0:
                window_t, window_images = time.perf_counter(), 0
            if step % checkpoint_every == 0:
                save_checkpoint(ckpt_dir / f"step{step}.pt")
                if not failed_once:  # the storage refuses one write: a failed checkpoint
                    failed_once = True
                    save_checkpoint(ckpt_dir / "missing-dir" / f"step{step}.pt")
            if step % 10 == 0:
                evaluate()
            if step >= min_steps and time.time() - started >= min_seconds:
                break
        if step >= min_steps and time.time() - started >= min_seconds:
            break
    evaluate()
    return JobSummary(
        run=metrics.run, steps=step, step_calls=calls, epoch=epoch, samples_seen=samples, batch_size=batch_size,
        num_classes=num_classes, checkpoints_ok=ckpt_ok, checkpoints_failed=ckpt_failed, restarts=restarts,
        resumes=resumes, skipped_steps=skipped, eval_sets=sorted(eval_sets), tar_fars=tar_fars,
        started_at=started, last_step_at=last_step_at,
    )


TRAINING_JOB: Callable[..., JobSummary] = train_tiny_job
"""The job the monitoring tests drive: (metrics, workdir) -> JobSummary. Swap in the real fr_train
job (its worker calling RunMetrics) here once it runs on CPU in seconds."""


def run_job_pushing_to(stack: MonitoringStack, workdir: Path, run: str, job_id: str, host: str,
                       ) -> tuple[RunMetrics, JobSummary]:
    """Run ``TRAINING_JOB`` as rank 0 of 1 pushing every 0.25 s, and wait until Prometheus holds its
    final values. The RunMetrics is returned open: the caller closes it (clean or not)."""
    from fr_train.config import MetricsConfig

    metrics = RunMetrics(MetricsConfig(pushgateway=stack.pushgateway_url, push_interval=0.25),
                         run, job_id, rank=0, world=1, host=host, checkpoint_interval_s=60.0)
    try:
        summary = TRAINING_JOB(metrics, workdir)
        prom = stack.prometheus
        wait_until(lambda: prom.query(f'fr_train_step{{run="{run}"}} == {summary.steps}')
                   and prom.query(f'fr_train_eval_accuracy{{run="{run}"}}'), 20, "the job's final push in Prometheus")
    except BaseException:
        metrics.close(clean=True)
        raise
    return metrics, summary


def finite(values: list[dict[str, Any]]) -> list[float]:
    """Finite sample values of an instant-query vector."""
    out = []
    for s in values:
        v = float(s["value"][1])
        if not math.isnan(v):
            out.append(v)
    return out
