"""fr_train.metrics.RunMetrics against a real Pushgateway and Prometheus (tests/monitoring.py).

Specification: a training job's metrics reach Prometheus through the Pushgateway with their run,
job id, rank and host labels and plausible values; /metrics can be served per rank instead; with
neither configured nothing listens; a dead Pushgateway never slows the loop and is logged once;
a clean finish deletes the rank's Pushgateway group, a crash keeps it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator

import psutil
import pytest
import torch
from prometheus_client.exposition import delete_from_gateway
from prometheus_client.parser import text_string_to_metric_families

from fr_train.config import MetricsConfig
from fr_train.metrics import PUSH_JOB, RunMetrics
from tests.monitoring import (
    JobSummary,
    MonitoringStack,
    free_port,
    http_get,
    monitoring_stack,  # noqa: F401  (fixture)
    run_job_pushing_to,
    wait_until,
)

RUN = "metrics-test-run"
JOB_ID = "raysubmit_test"
HOST = socket.gethostname()
# Every series the job must produce (name → what its samples must satisfy).
EXPECTED = (
    "fr_train_step", "fr_train_steps_total", "fr_train_epoch", "fr_train_samples_seen",
    "fr_train_last_step_timestamp_seconds", "fr_train_loss", "fr_train_learning_rate",
    "fr_train_images_per_second", "fr_train_global_images_per_second",
    "fr_train_step_duration_seconds_bucket", "fr_train_step_duration_seconds_sum",
    "fr_train_step_duration_seconds_count", "fr_train_step_phase_duration_seconds_sum",
    "fr_train_grad_norm", "fr_train_loss_scale", "fr_train_skipped_steps_total",
    "fr_train_head_sampled_classes", "fr_train_vpl_injected_fraction",
    "fr_train_memory_allocated_bytes", "fr_train_memory_reserved_bytes",
    "fr_train_eval_accuracy", "fr_train_eval_tar_at_far",
    "fr_train_checkpoint_write_duration_seconds_count", "fr_train_checkpoint_stall_duration_seconds_count",
    "fr_train_last_good_checkpoint_timestamp_seconds", "fr_train_checkpoints_total",
    "fr_train_checkpoint_interval_seconds", "fr_train_restarts_total", "fr_train_resumes_total",
    "fr_train_preemption_notices_total", "fr_train_start_time_seconds", "fr_train_world_size",
)


def _cfg(**kw: object) -> MetricsConfig:
    return MetricsConfig(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pushed_run(monitoring_stack: MonitoringStack, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
               ) -> Iterator[tuple[RunMetrics, JobSummary]]:
    """The training job pushing every 0.25 s; left open (not finished) until the module ends."""
    metrics, summary = run_job_pushing_to(monitoring_stack, tmp_path_factory.mktemp("job"), RUN, JOB_ID, HOST)
    try:
        yield metrics, summary
    finally:
        metrics.close(clean=True)


def _one(stack: MonitoringStack, expr: str) -> float:
    return stack.prometheus.value(expr)


def test_every_metric_arrives_through_the_pushgateway_with_run_job_rank_host_labels(
    monitoring_stack: MonitoringStack, pushed_run: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    """Each listed series exists for the run, carries run/job_id/rank/host, and the Pushgateway's
    job and grouping labels survive the scrape (honor_labels)."""
    series = monitoring_stack.prometheus.query(f'{{__name__=~"fr_train_.+", run="{RUN}"}}')
    names = {s["metric"]["__name__"] for s in series}
    missing = sorted(set(EXPECTED) - names)
    assert not missing, f"series missing in Prometheus: {missing}"
    for s in series:
        labels = s["metric"]
        assert (labels["run"], labels["job_id"], labels["rank"], labels["host"]) == (RUN, JOB_ID, "0", HOST), labels
        assert labels["job"] == PUSH_JOB, labels


def test_pushed_values_match_what_the_job_did(
    monitoring_stack: MonitoringStack, pushed_run: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    _, job = pushed_run
    q = lambda expr: _one(monitoring_stack, expr.replace("SEL", f'run="{RUN}"'))  # noqa: E731
    assert q("fr_train_step{SEL}") == job.steps
    assert q("fr_train_steps_total{SEL}") >= job.steps
    assert q("fr_train_epoch{SEL}") == job.epoch >= 1
    assert q("fr_train_samples_seen{SEL}") == job.samples_seen == job.steps * job.batch_size
    assert q("fr_train_step_duration_seconds_count{SEL}") == job.step_calls
    assert q('fr_train_step_phase_duration_seconds_count{SEL, phase="data"}') == job.step_calls
    assert 0 < q("fr_train_step_duration_seconds_sum{SEL}") < 60 * job.step_calls
    # The parts of a step add up to (at most) the step.
    parts = q("sum(fr_train_step_phase_duration_seconds_sum{SEL})")
    assert 0 < parts <= q("fr_train_step_duration_seconds_sum{SEL}") * (1 + 1e-9)
    assert q("fr_train_images_per_second{SEL}") > 0
    assert q("fr_train_global_images_per_second{SEL}") > 0
    assert math.isfinite(q("fr_train_loss{SEL}")) and q("fr_train_loss{SEL}") >= 0
    assert q("fr_train_learning_rate{SEL}") == pytest.approx(0.05)
    assert q("fr_train_grad_norm{SEL}") > 0
    assert 1 <= q("fr_train_loss_scale{SEL}") < 2.0**126  # backed off from the initial scale
    assert q("fr_train_skipped_steps_total{SEL}") == job.skipped_steps >= 1
    assert 1 <= q("fr_train_head_sampled_classes{SEL}") <= job.num_classes
    assert 0 < q("fr_train_vpl_injected_fraction{SEL}") <= 1
    assert q("fr_train_memory_allocated_bytes{SEL}") > 10 * 2**20  # the process RSS on CPU
    assert q("fr_train_memory_reserved_bytes{SEL}") >= q("fr_train_memory_allocated_bytes{SEL}") * 0.5
    for name in job.eval_sets:
        assert 0 <= q(f'fr_train_eval_accuracy{{SEL, set="{name}"}}') <= 1
        for far in job.tar_fars:
            assert 0 <= q(f'fr_train_eval_tar_at_far{{SEL, set="{name}", far="{far:g}"}}') <= 1
    assert q('fr_train_checkpoints_total{SEL, result="ok"}') == job.checkpoints_ok >= 2
    assert q('fr_train_checkpoints_total{SEL, result="failed"}') == job.checkpoints_failed == 1
    assert q("fr_train_checkpoint_write_duration_seconds_count{SEL}") == job.checkpoints_ok + job.checkpoints_failed
    assert job.started_at <= q("fr_train_last_good_checkpoint_timestamp_seconds{SEL}") <= job.last_step_at + 1
    assert q("fr_train_checkpoint_interval_seconds{SEL}") == 60
    assert q("fr_train_restarts_total{SEL}") == job.restarts == 1
    assert q("fr_train_resumes_total{SEL}") == job.resumes == 1
    assert q("fr_train_start_time_seconds{SEL}") <= job.started_at
    assert q("fr_train_world_size{SEL}") == 1
    assert abs(q("fr_train_last_step_timestamp_seconds{SEL}") - job.last_step_at) < 1


def test_step_counter_increases_over_the_run_in_prometheus(
    monitoring_stack: MonitoringStack, pushed_run: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    """Scraped while the job ran, the step counter rose through several distinct values."""
    _, job = pushed_run
    result = monitoring_stack.prometheus.query_range(
        f'fr_train_steps_total{{run="{RUN}"}}', job.started_at, time.time(), 0.5)
    assert len(result) == 1, result
    values = [float(v) for _, v in result[0]["values"]]
    assert values == sorted(values), "a counter went down"
    assert len(set(values)) >= 3, f"too few distinct scraped values: {sorted(set(values))}"
    # Re-done steps after the restart count too: this process took at least `steps` steps.
    assert monitoring_stack.prometheus.value(f'fr_train_steps_total{{run="{RUN}"}}') >= job.steps


def test_each_rank_pushes_its_own_group_and_a_clean_finish_deletes_only_its_own(
    monitoring_stack: MonitoringStack,  # noqa: F811
) -> None:
    run = "metrics-groups"
    cfg = _cfg(pushgateway=monitoring_stack.pushgateway_url, push_interval=0.2)
    ranks = [RunMetrics(cfg, run, JOB_ID, rank=r, world=2, host=HOST) for r in range(2)]
    for r, m in enumerate(ranks):
        m.observe_step(step=5, epoch=0, loss=1.0 + r, lr=0.1, images_per_s_rank=10.0, images_per_s_global=20.0,
                       samples_seen=80, data_s=0.01, forward_s=0.02, backward_s=0.03, optimizer_s=0.01, step_s=0.07)

    def groups() -> set[str]:
        return {g["rank"] for g in monitoring_stack.pushgateway_groups() if g.get("run") == run
                and g.get("job") == PUSH_JOB}

    wait_until(lambda: groups() == {"0", "1"}, 10, "both ranks' groups in the Pushgateway")
    prom = monitoring_stack.prometheus
    wait_until(lambda: len(prom.query(f'fr_train_loss{{run="{run}"}}')) == 2, 10, "both ranks in Prometheus")
    losses = {s["metric"]["rank"]: float(s["value"][1]) for s in prom.query(f'fr_train_loss{{run="{run}"}}')}
    assert losses == {"0": 1.0, "1": 2.0}
    ranks[1].close(clean=False)  # a crashed rank keeps its last values
    ranks[0].close(clean=True)
    assert groups() == {"1"}
    delete_from_gateway(monitoring_stack.pushgateway_url, job=PUSH_JOB, grouping_key={"run": run, "rank": "1"})


def test_serves_metrics_on_port_plus_rank_bound_to_loopback_and_prometheus_scrapes_it(
    monitoring_stack: MonitoringStack,  # noqa: F811
) -> None:
    """metrics.port=P: rank r answers /metrics on 127.0.0.1:P+r; the ops `fr_train_workers`
    file_sd job scrapes it; close() frees the port."""
    base = free_port()
    while True:  # P+1 must be free too
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            break
        except OSError:
            base = free_port()
    m = RunMetrics(_cfg(port=base), "metrics-served", JOB_ID, rank=1, world=2, host=HOST)
    try:
        assert m.server_address == ("127.0.0.1", base + 1)
        m.observe_step(step=3, epoch=0, loss=2.5, lr=0.1, images_per_s_rank=10.0, images_per_s_global=20.0,
                       samples_seen=48, data_s=0.01, forward_s=0.02, backward_s=0.03, optimizer_s=0.01, step_s=0.07)
        text = http_get(f"http://127.0.0.1:{base + 1}/metrics").decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        (sample,) = fams["fr_train_loss"].samples
        assert sample.value == 2.5
        assert sample.labels == {"run": "metrics-served", "job_id": JOB_ID, "rank": "1", "host": HOST}
        monitoring_stack.set_worker_targets([f"127.0.0.1:{base + 1}"])
        prom = monitoring_stack.prometheus
        got = wait_until(lambda: prom.query('fr_train_step{run="metrics-served", job="fr_train_workers"}'),
                         20, "Prometheus to scrape the worker endpoint")
        assert float(got[0]["value"][1]) == 3
    finally:
        m.close(clean=True)
    with pytest.raises((OSError, urllib.error.URLError)):
        http_get(f"http://127.0.0.1:{base + 1}/metrics", timeout=1.0)


def test_a_port_in_use_is_a_clear_error_naming_metrics_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=r"metrics\.port=.*port \+ rank"):
            RunMetrics(_cfg(port=port), "metrics-busy", JOB_ID, rank=0, world=1, host=HOST)


def test_a_malformed_pushgateway_address_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"metrics\.pushgateway='ftp://x:1'"):
        RunMetrics(_cfg(pushgateway="ftp://x:1"), "metrics-bad", JOB_ID, rank=0, world=1, host=HOST)


def test_with_neither_pushgateway_nor_port_nothing_listens_and_no_thread_starts() -> None:
    proc = psutil.Process()

    def listening() -> set[tuple[str, int]]:
        return {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}

    before_sockets, before_threads = listening(), {t.ident for t in threading.enumerate()}
    m = RunMetrics(_cfg(), "metrics-silent", JOB_ID, rank=0, world=1, host=HOST)
    m.observe_step(step=1, epoch=0, loss=1.0, lr=0.1, images_per_s_rank=1.0, images_per_s_global=1.0,
                   samples_seen=1, data_s=0.0, forward_s=0.0, backward_s=0.0, optimizer_s=0.0, step_s=0.0)
    assert listening() == before_sockets
    assert {t.ident for t in threading.enumerate()} <= before_threads
    assert m.server_address is None and m.push_attempts == 0
    m.close(clean=True)


def _refused_address() -> str:
    port = free_port()  # bound then released: connecting is refused
    return f"http://127.0.0.1:{port}"


class _Blackhole:
    """A TCP port that accepts connections (kernel backlog) but never answers: pushes hang until
    their timeout, the worst case for a training loop that would wait on them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def _timed_loop(metrics: RunMetrics, steps: int, until: Callable[[], bool] = lambda: True,
                ) -> tuple[float, list[float]]:
    """A short real loop (tiny torch model) reporting every step, for ``steps`` steps and then until
    ``until()`` holds (at most 30 s); returns (loop seconds, observe_step seconds)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 64), torch.randint(0, 8, (32,))
    observe: list[float] = []
    t_loop = time.perf_counter()
    step = 0
    while step < steps or (not until() and time.perf_counter() - t_loop < 30):
        step += 1
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        o0 = time.perf_counter()
        metrics.observe_step(step=step, epoch=0, loss=float(loss.detach()), lr=0.1, images_per_s_rank=32 / (t3 - t0),
                             images_per_s_global=32 / (t3 - t0), samples_seen=32 * step, data_s=0.0,
                             forward_s=t1 - t0, backward_s=t2 - t1, optimizer_s=t3 - t2, step_s=t3 - t0)
        observe.append(time.perf_counter() - o0)
    return time.perf_counter() - t_loop, observe


def test_an_unreachable_pushgateway_does_not_slow_the_loop_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused and hanging gateways vs. none: observe_step never waits for a push (which against
    the hanging gateway lasts its 1 s timeout); close() is bounded; one warning per RunMetrics.
    Prints the loop and observe_step times of the three cases."""
    caplog.set_level(logging.DEBUG, logger="fr_train.metrics")
    steps, interval = 300, 0.05
    results: dict[str, tuple[float, list[float]]] = {}
    baseline = RunMetrics(_cfg(), "metrics-none", JOB_ID, 0, 1, HOST)
    _timed_loop(baseline, 20)  # warm-up (first-call allocations, torch kernels)
    results["none"] = _timed_loop(baseline, steps)
    baseline.close(clean=False)

    refused = RunMetrics(_cfg(pushgateway=_refused_address(), push_interval=interval), "metrics-refused",
                         JOB_ID, 0, 1, HOST)
    results["refused"] = _timed_loop(refused, steps)
    wait_until(lambda: refused.push_failures >= 4, 10, "4 failed pushes (with backoff)")
    refused.close(clean=True)

    hole = _Blackhole()
    try:
        hanging = RunMetrics(_cfg(pushgateway=hole.url, push_interval=interval), "metrics-hanging", JOB_ID, 0, 1, HOST)
        wait_until(lambda: hanging.push_attempts >= 1, 5, "a push in flight")
        # Keep stepping until a push has hung for its whole timeout: the worst case happened mid-loop.
        results["hanging"] = _timed_loop(hanging, steps, until=lambda: hanging.push_failures >= 1)
        assert hanging.push_failures >= 1
        t_close = time.perf_counter()
        hanging.close(clean=True)
        close_s = time.perf_counter() - t_close
    finally:
        hole.close()

    for mode, (loop_s, obs) in results.items():
        print(f"{mode:8s}: loop {loop_s * 1e3:7.1f} ms for {len(obs)} steps, observe_step median "
              f"{statistics.median(obs) * 1e6:6.1f} µs, p99 {sorted(obs)[int(0.99 * len(obs))] * 1e6:7.1f} µs")
    print(f"close() with a hanging gateway: {close_s:.2f} s")
    # The loop times are printed, not asserted (a shared CPU makes them noisy). What must hold: no
    # observe_step call waited for the network; a push to the hanging gateway blocks for its 1 s timeout.
    for mode in ("refused", "hanging"):
        slowest = max(results[mode][1])
        assert slowest < 0.5, f"{mode}: an observe_step call waited {slowest:.2f} s (a push on the step path?)"
    assert close_s < 4.0  # bounded by the push timeout (1 s at this interval), not hanging
    warnings = [r for r in caplog.records if r.name == "fr_train.metrics" and r.levelno >= logging.WARNING
                and "cannot push" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per RunMetrics (refused, hanging)
    assert refused.push_failures >= 4


def test_observe_eval_rejects_values_that_are_not_ratios() -> None:
    m = RunMetrics(_cfg(), "metrics-eval", JOB_ID, 0, 1, HOST)
    with pytest.raises(ValueError, match=r"lfw.*accuracy 97\.5"):
        m.observe_eval("lfw", 97.5, {1e-3: 0.9})
    with pytest.raises(ValueError, match=r"lfw.*FAR 0"):
        m.observe_eval("lfw", 0.975, {0.0: 0.9})


def test_rank_outside_world_and_empty_run_are_rejected() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside"):
        RunMetrics(_cfg(), "r", JOB_ID, rank=2, world=2, host=HOST)
    with pytest.raises(ValueError, match="run name is empty"):
        RunMetrics(_cfg(), "", JOB_ID, rank=0, world=1, host=HOST)


def test_a_nan_loss_is_exported_as_nan_so_the_alert_can_see_it() -> None:
    m = RunMetrics(_cfg(), "metrics-nan", JOB_ID, 0, 1, HOST)
    m.observe_step(step=1, epoch=0, loss=float("nan"), lr=0.1, images_per_s_rank=1.0, images_per_s_global=1.0,
                   samples_seen=1, data_s=0.0, forward_s=0.0, backward_s=0.0, optimizer_s=0.0, step_s=0.0)
    v = m.registry.get_sample_value("fr_train_loss", {"run": "metrics-nan", "job_id": JOB_ID, "rank": "0", "host": HOST})
    assert v is not None and math.isnan(v)


def _train_pushing(rank: int, world: int, cfg_dict: dict) -> int:
    from fr_train.config import TrainConfig
    from fr_train.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg_dict), rank, world, torch.device("cpu"), job_id="fr-train-job")
    trainer.fit()
    return trainer.state.step


@pytest.mark.slow
def test_the_fr_train_job_pushes_its_metrics_for_every_rank(
    monitoring_stack: MonitoringStack, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
) -> None:
    """The real trainer (DALI data, DeepSpeed backbone, sharded VPL head, 2 gloo ranks) pushes
    to the Pushgateway: Prometheus sees steps, loss, throughput, sampled classes, VPL injection,
    evaluation and checkpoints for each rank, and a clean finish deletes the ranks' groups."""
    import time as _time

    from cluster.launch import prepare_data
    from fr_train.config import build_config
    from tests.distributed import run_distributed
    from tests.test_train_e2e import SYNTH

    run = f"trainer-{os.getpid()}"
    cfg = build_config("mbf", "vpl", overrides=[
        f"data.cache_dir={tmp_path_factory.mktemp('metrics_cache')}", *SYNTH, "data.synthetic.image_size=32",
        f"run.storage={tmp_path_factory.mktemp('metrics_runs')}", f"run.name={run}", "data.batch_size=16",
        "schedule.max_steps=30", "head.vpl_start_iter=3", "head.sample_rate=0.5", "checkpoint.every_steps=10",
        "eval.every_steps=0", f"metrics.pushgateway={monitoring_stack.pushgateway_url}", "metrics.push_interval=0.25",
        "run.export_onnx=false"])
    cfg.data.path = str(prepare_data(cfg))
    started = _time.time()
    assert run_distributed(_train_pushing, 2, cfg.to_dict(), timeout=600) == [30, 30]
    prom = monitoring_stack.prometheus
    window = f"[{int(_time.time() - started) + 30}s]"

    def last(name: str, rank: int) -> float:
        return prom.value(f'max_over_time({name}{{run="{run}", rank="{rank}", job_id="fr-train-job"}}{window})')

    deadline = _time.time() + 20
    while _time.time() < deadline and not prom.query(f'max_over_time(fr_train_step{{run="{run}"}}{window}) >= 30'):
        _time.sleep(0.5)
    for rank in (0, 1):
        assert last("fr_train_step", rank) == 30
        assert last("fr_train_images_per_second", rank) > 0
        assert 0 < last("fr_train_loss", rank) < 100
        assert last("fr_train_head_sampled_classes", rank) > 0
        assert 0 < last("fr_train_vpl_injected_fraction", rank) <= 1
        assert last("fr_train_last_good_checkpoint_timestamp_seconds", rank) >= started
    assert last("fr_train_eval_accuracy", 0) > 0.4  # rank 0 evaluates at step 0 and at the end
    assert not [g for g in monitoring_stack.pushgateway_groups() if g.get("run") == run]  # clean finish
