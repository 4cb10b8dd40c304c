"""Training metrics of one rank for Prometheus: push to a Pushgateway and/or serve ``/metrics``.

Why this shape: a training step must never wait on monitoring. ``observe_*`` only set gauges and
observe histograms in this rank's own ``CollectorRegistry`` (no global state, so several ranks or
runs can live in one process, e.g. in tests). Delivery happens elsewhere: a background thread
pushes the registry to the Pushgateway every ``push_interval`` seconds (a dead gateway is retried
with exponential backoff and logged once), and/or prometheus-client's HTTP server answers scrapes
on ``port + rank``. With neither configured nothing is started and nothing listens.

Names follow the Prometheus conventions (prefix ``fr_train_``, base units, ``_total`` counters,
histograms for durations); ops/prometheus/alerts.yml and ops/grafana/dashboards/fr_train.json
query exactly these names, and tests/test_ops_assets.py runs every such query against a real
Prometheus fed by this module.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import delete_from_gateway, push_to_gateway, start_http_server
from prometheus_client.registry import Collector

from fr_train.config import MetricsConfig

log = logging.getLogger(__name__)

PUSH_JOB = "fr_train"
"""The Pushgateway ``job`` of every group; the grouping key adds ``run`` and ``rank``."""
LABELS = ("run", "job_id", "rank", "host")
"""Labels carried by every fr_train_ series."""
PHASES = ("data", "forward", "backward", "optimizer")
"""Parts of a step; ``backward`` includes the gradient communication it overlaps with."""
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
MAX_BACKOFF_S = 60.0
"""Longest wait between push attempts while the Pushgateway is unreachable."""


def _push_timeout(interval: float) -> float:
    """HTTP timeout of one push: long enough for a busy gateway, short enough that close() is quick."""
    return min(5.0, max(1.0, interval))


def _check_gateway_url(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(
            f"metrics.pushgateway={url!r} is not a Pushgateway address: give http://HOST:PORT "
            "(e.g. http://127.0.0.1:9091), or leave it empty to disable pushing"
        )
    return url


class _MemoryCollector(Collector):
    """Memory of this rank, sampled when the registry is collected (push or scrape), so the
    training step pays nothing. CUDA: the caching allocator's allocated/reserved bytes of the
    rank's device. CPU: there is no caching allocator, so both are the process RSS."""

    def __init__(self, label_values: tuple[str, ...], device: Any) -> None:
        import psutil

        self._label_values = label_values
        self._device = device
        self._process = psutil.Process()

    def _sample(self) -> tuple[str, float, float]:
        if self._device is not None and getattr(self._device, "type", "cpu") == "cuda":
            import torch

            return (str(self._device), float(torch.cuda.memory_allocated(self._device)),
                    float(torch.cuda.memory_reserved(self._device)))
        rss = float(self._process.memory_info().rss)
        return "cpu", rss, rss

    def collect(self) -> Iterator[GaugeMetricFamily]:
        device, allocated, reserved = self._sample()
        labels = [*LABELS, "device"]
        values = [*self._label_values, device]
        g_alloc = GaugeMetricFamily("fr_train_memory_allocated_bytes",
                                    "Memory in use by tensors (CUDA allocator) or the process RSS on CPU.",
                                    labels=labels)
        g_alloc.add_metric(values, allocated)
        g_res = GaugeMetricFamily("fr_train_memory_reserved_bytes",
                                  "Memory held by the CUDA caching allocator, or the process RSS on CPU.",
                                  labels=labels)
        g_res.add_metric(values, reserved)
        yield g_alloc
        yield g_res


class _Pusher(threading.Thread):
    """Pushes the registry every ``interval`` s; on failure backs off exponentially (≤ 60 s) and
    logs the first failure only, so a dead gateway neither slows nor floods the job."""

    def __init__(self, gateway: str, registry: CollectorRegistry, grouping_key: dict[str, str],
                 interval: float) -> None:
        super().__init__(name=f"fr_train-metrics-push-{grouping_key.get('rank', '')}", daemon=True)
        self.gateway, self.registry, self.grouping_key = gateway, registry, grouping_key
        self.interval = interval
        self.timeout = _push_timeout(interval)
        self.stop_event = threading.Event()
        self.attempts = 0
        self.failures = 0
        self.last_ok = False
        self._logged_failure = False
        self._lock = threading.Lock()  # one push/delete at a time (the thread vs. close())

    def push(self, timeout: float | None = None) -> bool:
        with self._lock:
            self.attempts += 1
            try:
                push_to_gateway(self.gateway, job=PUSH_JOB, registry=self.registry,
                                grouping_key=self.grouping_key, timeout=timeout or self.timeout)
            except Exception as exc:  # any failure (refused, timeout, HTTP 5xx) must not reach training
                self.failures += 1
                self.last_ok = False
                if not self._logged_failure:
                    self._logged_failure = True
                    log.warning(
                        "metrics: cannot push to the Pushgateway %s (%s: %s); training continues, retrying "
                        "with backoff up to %.0f s; further failures are not logged",
                        self.gateway, type(exc).__name__, exc, MAX_BACKOFF_S,
                    )
                else:
                    log.debug("metrics: push to %s failed again: %s", self.gateway, exc)
                return False
            if not self.last_ok and self._logged_failure and self.failures:
                log.info("metrics: the Pushgateway %s is reachable again", self.gateway)
            self.last_ok = True
            return True

    def delete(self, timeout: float | None = None) -> bool:
        with self._lock:
            try:
                delete_from_gateway(self.gateway, job=PUSH_JOB, grouping_key=self.grouping_key,
                                    timeout=timeout or self.timeout)
            except Exception as exc:
                log.warning("metrics: could not delete group %s from the Pushgateway %s: %s",
                            self.grouping_key, self.gateway, exc)
                return False
            return True

    def run(self) -> None:
        delay = 0.0  # first push right away: the run shows up before its first step completes
        while not self.stop_event.wait(delay):
            if self.push():
                delay = self.interval
            else:  # exponential backoff while the gateway is down
                delay = min(max(delay, self.interval) * 2, max(MAX_BACKOFF_S, self.interval))


class RunMetrics:
    """The Prometheus metrics of one rank of one run (see the module docstring for delivery).

    Every series carries ``run``, ``job_id``, ``rank`` and ``host``. ``checkpoint_interval_s`` (the
    configured checkpoint period) is exported so the "no good checkpoint for 2 intervals" alert
    knows the period; ``device`` selects what the memory gauges report (default: the current CUDA
    device when CUDA is available, else the process RSS).
    """

    def __init__(self, cfg: MetricsConfig, run: str, job_id: str, rank: int, world: int, host: str, *,
                 checkpoint_interval_s: float = 0.0, device: Any = None) -> None:
        if not run:
            raise ValueError("RunMetrics: run name is empty; metrics are grouped by run (set run.name)")
        if not 0 <= rank < world:
            raise ValueError(f"RunMetrics: rank {rank} is outside [0, world={world})")
        self.cfg = cfg
        self.run, self.job_id, self.rank, self.world, self.host = run, job_id, rank, world, host
        self.registry = CollectorRegistry(auto_describe=False)
        self._lv = (run, job_id, str(rank), host)
        self._closed = False
        self._last_step: int | None = None
        self._last_skipped = 0.0
        self._children: dict[tuple[Any, ...], Any] = {}
        self._define()
        if device is None:
            device = self._default_device()
        self.registry.register(_MemoryCollector(self._lv, device))

        now = time.time()
        self._child(self.start_time).set(now)
        self._child(self.world_size).set(world)
        if checkpoint_interval_s > 0:
            self._child(self.checkpoint_interval).set(checkpoint_interval_s)
        for result in ("ok", "failed"):
            self._child(self.checkpoints, result)  # counters start at 0, so rate()/increase() see the first one
        self._child(self.restarts)
        self._child(self.resumes)
        self._child(self.preemption_notices)

        self._pusher: _Pusher | None = None
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        if cfg.port:
            self._serve(cfg.port + rank, cfg.bind)
        if cfg.pushgateway:
            gateway = _check_gateway_url(cfg.pushgateway)
            if cfg.push_interval <= 0:
                raise ValueError(f"metrics.push_interval={cfg.push_interval} must be > 0 seconds")
            self._pusher = _Pusher(gateway, self.registry, {"run": run, "rank": str(rank)}, cfg.push_interval)
            self._pusher.start()

    # ------------------------------------------------------------------ definitions
    def _define(self) -> None:
        r, L = self.registry, LABELS

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*L, *extra], registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*L, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, [*L, *extra], registry=r, buckets=buckets)

        # prometheus-client appends _total to counter names itself: declare them without it.
        self.step = gauge("fr_train_step", "Global optimizer step reached (restored on resume).")
        self.steps = counter("fr_train_steps", "Optimizer steps taken by this process.")
        self.epoch = gauge("fr_train_epoch", "Current epoch.")
        self.samples_seen = gauge("fr_train_samples_seen", "Training images seen by the run (global, restored on resume).")
        self.last_step_time = gauge("fr_train_last_step_timestamp_seconds", "Unix time of the last completed step.")
        self.loss = gauge("fr_train_loss", "Training loss of the last step (global-batch mean).")
        self.lr = gauge("fr_train_learning_rate", "Learning rate of the last step.")
        self.ips_rank = gauge("fr_train_images_per_second", "Training images per second of this rank.")
        self.ips_global = gauge("fr_train_global_images_per_second", "Training images per second of the whole run.")
        self.step_time = histogram("fr_train_step_duration_seconds", "Wall time of one training step.", STEP_BUCKETS)
        self.phase_time = histogram(
            "fr_train_step_phase_duration_seconds",
            "Wall time of the parts of a step: data wait, forward, backward (+ gradient communication), optimizer.",
            STEP_BUCKETS, ("phase",),
        )
        self.grad_norm = gauge("fr_train_grad_norm", "Global L2 norm of the backbone gradient before clipping.")
        self.loss_scale = gauge("fr_train_loss_scale", "Dynamic loss scale (fp16 mixed precision).")
        self.skipped = counter("fr_train_skipped_steps", "Steps skipped because of inf/NaN gradients (fp16).")
        self.sampled = gauge("fr_train_head_sampled_classes", "Classes (rows of this rank's head shard) sampled in the last step.")
        self.vpl_fraction = gauge("fr_train_vpl_injected_fraction",
                                  "Fraction of the sampled prototypes mixed with their VPL memory in the last step.")
        self.eval_accuracy = gauge("fr_train_eval_accuracy", "Verification accuracy (ratio) per set.", ("set",))
        self.eval_tar = gauge("fr_train_eval_tar_at_far", "True accept rate at a false accept rate, per set.",
                              ("set", "far"))
        self.eval_identification = gauge("fr_train_eval_identification",
                                         "IJB 1:N identification rates (rank1/5/10, tpir@fpir=X) per set.",
                                         ("set", "metric"))
        self.ckpt_write = histogram("fr_train_checkpoint_write_duration_seconds",
                                    "Time to write a checkpoint (start to durable).", CHECKPOINT_BUCKETS)
        self.ckpt_stall = histogram("fr_train_checkpoint_stall_duration_seconds",
                                    "Time the training loop was blocked by a checkpoint.", CHECKPOINT_BUCKETS)
        self.last_good_ckpt = gauge("fr_train_last_good_checkpoint_timestamp_seconds",
                                    "Unix time the last checkpoint that verified OK was written.")
        self.checkpoints = counter("fr_train_checkpoints", "Checkpoint attempts by result.", ("result",))
        self.checkpoint_interval = gauge("fr_train_checkpoint_interval_seconds", "Configured checkpoint period.")
        self.restarts = counter("fr_train_restarts", "Times this worker was restarted after a failure.")
        self.resumes = counter("fr_train_resumes", "Times this worker resumed from a checkpoint.")
        self.preemption_notices = counter("fr_train_preemption_notices",
                                          "Preemption notices (a node of the run drained) answered with a checkpoint.")
        self.start_time = gauge("fr_train_start_time_seconds", "Unix time this worker process started the run.")
        self.world_size = gauge("fr_train_world_size", "Number of ranks of the run.")
        self.world_size_max = gauge("fr_train_world_size_max", "Largest number of ranks of the run (run.num_workers; "
                                    "an elastic run trains on fewer while nodes are missing).")
        self.resizes = counter("fr_train_resizes", "Times an elastic run restarted on another number of ranks, by "
                               "direction (shrink: nodes lost; grow: nodes back). Rank 0, counted over the run.",
                               ("direction",))
        self.below_max_since = gauge("fr_train_below_max_size_since_timestamp_seconds",
                                     "Unix time an elastic run first started below its largest size in its current "
                                     "stretch below it; 0 at full size. Rank 0.")
        self.below_max_alert = gauge("fr_train_below_max_size_alert_seconds",
                                     "How long an elastic run may train below its largest size before "
                                     "FrTrainBelowMaxSize fires (metrics.below_max_alert_minutes).")

    def _child(self, metric: Any, *extra: str) -> Any:
        """The labelled series (cached: ``labels()`` takes a lock and builds a tuple every call)."""
        key = (id(metric), *extra)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*self._lv, *extra)
        return child

    @staticmethod
    def _default_device() -> Any:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return None

    def _serve(self, port: int, bind: str) -> None:
        try:
            self._server, self._server_thread = start_http_server(port, addr=bind, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"metrics.port={self.cfg.port}: rank {self.rank} cannot serve /metrics on {bind}:{port} "
                f"(port + rank): {exc}; choose another metrics.port or set it to 0"
            ) from exc

    # ------------------------------------------------------------------ observations
    def observe_step(
        self, *, step: int, epoch: int, loss: float, lr: float, images_per_s_rank: float,
        images_per_s_global: float, samples_seen: int, data_s: float, forward_s: float, backward_s: float,
        optimizer_s: float, step_s: float, grad_norm: float | None = None, loss_scale: float | None = None,
        skipped_steps: int | None = None, sampled_classes: int | None = None,
        vpl_injected_fraction: float | None = None,
    ) -> None:
        """Record one step (call it every step). ``skipped_steps`` is the optimizer's cumulative
        count (e.g. DeepSpeed ``engine.skipped_steps``); a NaN loss is recorded as NaN so the
        alert on it can fire."""
        c = self._child
        c(self.step).set(step)
        # Steps since the last call (1 on the first call, also after a resume at step N).
        done = 1 if self._last_step is None else step - self._last_step
        if done > 0:
            c(self.steps).inc(done)
        self._last_step = step
        c(self.epoch).set(epoch)
        c(self.samples_seen).set(samples_seen)
        c(self.loss).set(loss)
        c(self.lr).set(lr)
        c(self.ips_rank).set(images_per_s_rank)
        c(self.ips_global).set(images_per_s_global)
        c(self.step_time).observe(step_s)
        c(self.phase_time, "data").observe(data_s)
        c(self.phase_time, "forward").observe(forward_s)
        c(self.phase_time, "backward").observe(backward_s)
        c(self.phase_time, "optimizer").observe(optimizer_s)
        if grad_norm is not None:
            c(self.grad_norm).set(grad_norm)
        if loss_scale is not None:
            c(self.loss_scale).set(loss_scale)
        if skipped_steps is not None:
            # A smaller cumulative count means the optimizer was rebuilt (resume): count from 0 again.
            delta = skipped_steps - self._last_skipped if skipped_steps >= self._last_skipped else skipped_steps
            c(self.skipped).inc(delta)
            self._last_skipped = skipped_steps
        if sampled_classes is not None:
            c(self.sampled).set(sampled_classes)
        if vpl_injected_fraction is not None:
            c(self.vpl_fraction).set(vpl_injected_fraction)
        c(self.last_step_time).set(time.time())

    def observe_eval(self, set_name: str, accuracy: float, tar_at_far: Mapping[float, float]) -> None:
        """Verification results of one set; ``tar_at_far`` maps FAR (e.g. 1e-3) to TAR."""
        if not (0.0 <= accuracy <= 1.0 or math.isnan(accuracy)):
            raise ValueError(f"observe_eval({set_name!r}): accuracy {accuracy} is not a ratio in [0, 1]")
        self._child(self.eval_accuracy, set_name).set(accuracy)
        for far, tar in tar_at_far.items():
            if not 0.0 < far <= 1.0:
                raise ValueError(f"observe_eval({set_name!r}): FAR {far} is not in (0, 1]")
            self._child(self.eval_tar, set_name, f"{far:g}").set(tar)

    def observe_ijb(self, record: Mapping[str, Any]) -> None:
        """One IJB record (fr_train/evaluation/ijb.py): 1:1 TAR@FAR (the published rule) into the
        verification gauge under the set's name (IJBB/IJBC); 1:N rates into the identification gauge."""
        name = str(record["set"])
        if record["protocol"] == "1:1":
            for far, tar in record["tar_at_far"].items():
                self._child(self.eval_tar, name, f"{float(far):g}").set(tar)
        else:
            for key in ("rank1", "rank5", "rank10"):
                self._child(self.eval_identification, name, key).set(record[key])
            for fpir, tpir in record["tpir_at_fpir"].items():
                if tpir is not None:
                    self._child(self.eval_identification, name, f"tpir@fpir={float(fpir):g}").set(tpir)

    def observe_checkpoint(self, write_s: float, stall_s: float, ok: bool) -> None:
        """One checkpoint attempt: ``write_s`` until durable, ``stall_s`` the loop was blocked
        (≤ write_s for asynchronous writes); ``ok`` once it verified."""
        self._child(self.ckpt_write).observe(write_s)
        self._child(self.ckpt_stall).observe(stall_s)
        self._child(self.checkpoints, "ok" if ok else "failed").inc()
        if ok:
            self._child(self.last_good_ckpt).set(time.time())

    def mark_restart(self) -> None:
        """This worker was restarted after a failure (Ray Train FailureConfig)."""
        self._child(self.restarts).inc()

    def mark_resume(self) -> None:
        """This worker resumed from a checkpoint."""
        self._child(self.resumes).inc()

    def observe_size(self, max_world: int, resizes: Mapping[str, int], below_max_since: float,
                     alert_after_s: float) -> None:
        """Rank 0 of an elastic run, at its start: the largest size, the resizes of the run so far (from
        its log), when its current stretch below the largest size began; and the departed ranks'
        Pushgateway groups are deleted (their last values would otherwise trip the stalled-run alert)."""
        self._child(self.world_size_max).set(max_world)
        for direction in ("shrink", "grow"):
            self._child(self.resizes, direction).inc(resizes.get(direction, 0))
        self._child(self.below_max_since).set(below_max_since)
        self._child(self.below_max_alert).set(alert_after_s)
        if self._pusher is not None:
            for rank in range(self.world, max_world):
                _Pusher(self._pusher.gateway, self.registry, {"run": self.run, "rank": str(rank)},
                        self._pusher.interval).delete()

    def mark_preemption(self) -> None:
        """A preemption notice arrived; a just-in-time checkpoint follows."""
        self._child(self.preemption_notices).inc()

    # ------------------------------------------------------------------ delivery state / end
    @property
    def push_attempts(self) -> int:
        return self._pusher.attempts if self._pusher else 0

    @property
    def push_failures(self) -> int:
        return self._pusher.failures if self._pusher else 0

    @property
    def server_address(self) -> tuple[str, int] | None:
        """(host, port) of the /metrics server, or None when not serving."""
        return None if self._server is None else self._server.server_address[:2]

    def close(self, clean: bool) -> None:
        """Stop delivery: a final push, then (``clean``: the run finished) delete this rank's
        Pushgateway group so finished runs do not linger or trip the stalled-run alert. A crashed
        run keeps its group, so its last values and the stall alert stay visible. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pusher is not None:
            self._pusher.stop_event.set()
            self._pusher.join(timeout=self._pusher.timeout + 1.0)
            # A gateway that is already failing gets one short last try, so the end of a run stays quick.
            final_timeout = self._pusher.timeout if self._pusher.last_ok else 1.0
            # If even that fails the gateway is down, and a delete would only wait for the same timeout.
            if self._pusher.push(timeout=final_timeout) and clean:
                self._pusher.delete(timeout=final_timeout)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5.0)
            self._server = None

    def __enter__(self) -> RunMetrics:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(clean=exc_type is None)
