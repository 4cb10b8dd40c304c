"""ops/: the Prometheus config, the alert rules and the Grafana dashboard, checked against a real
Prometheus + Pushgateway fed by a real training job (tests/monitoring.py).

Specification: promtool accepts the config and the rules; every PromQL expression of the
dashboard and of the alert rules returns data for a run (so no panel is empty and no name drifts
from fr_train/metrics.py); every exported metric has a panel; the stalled-run alert fires once a
job stops stepping and clears when the run finishes cleanly.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import yaml

from fr_train.config import MetricsConfig
from fr_train.metrics import RunMetrics
from tests.monitoring import (
    OPS_ALERTS,
    OPS_DASHBOARD,
    OPS_PROMETHEUS,
    ROOT,
    STALL_AFTER_S,
    JobSummary,
    MonitoringStack,
    alert_rules,
    finite,
    free_port,
    monitoring_binaries,
    monitoring_stack,  # noqa: F401  (fixture)
    run_job_pushing_to,
    wait_until,
)

RUN = "ops-test-run"
SERVED_RUN = "ops-served-run"
RUN_HOST = socket.gethostname()
OTHER_HOST = "127.0.0.1"  # the second GPU node: its file_sd entry sets no host, so the relabel takes its address
# (gpu, utilisation %, frame buffer used MiB, power W, SM clock MHz) of each node's GPUs.
RUN_HOST_GPUS = [(0, 73.0, 40960.0, 612.5, 1980.0), (1, 41.0, 1024.0, 310.0, 1755.0)]
OTHER_HOST_GPUS = [(0, 99.0, 80000.0, 700.0, 1410.0)]
GPU_PANELS = {"GPU utilisation": (1, 1.0), "GPU memory used": (2, 2.0**20), "GPU power": (3, 1.0),
              "SM clock": (4, 1e6)}
"""Panel title: (field of the tuples above, the panel's unit conversion)."""
OPS = ROOT / "ops"
GRAFANA_PROVISIONING = OPS / "grafana" / "provisioning"
RATE_INTERVAL = "1m"
"""What Grafana's $__rate_interval becomes here: a window that covers the (seconds-long) run."""


def dcgm_exposition(gpus: list[tuple[int, float, float, float, float]], exporter_hostname: str) -> str:
    """A /metrics page as dcgm-exporter (4.x) writes it: HELP/TYPE lines, its labels per GPU. Its own
    ``Hostname`` label is the exporter's container name here, as under Docker without host
    networking, which is why the dashboard joins on the scrape's ``host`` label instead."""
    fields = [("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
              ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."),
              ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)."),
              ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).")]
    lines = []
    for i, (name, help_text) in enumerate(fields, start=1):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for gpu in gpus:
            labels = (f'gpu="{gpu[0]}",UUID="GPU-{gpu[0]:08d}-0000-0000-0000-000000000000",'
                      f'pci_bus_id="00000000:{gpu[0] + 0x18:02X}:00.0",device="nvidia{gpu[0]}",'
                      f'modelName="NVIDIA H200",Hostname="{exporter_hostname}",DCGM_FI_DRIVER_VERSION="580.95.05"')
            lines.append(f"{name}{{{labels}}} {gpu[i]:g}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def serving(text: str) -> Iterator[int]:
    """``text`` served at http://127.0.0.1:PORT/metrics (Prometheus's text format) while inside."""
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def job(monitoring_stack: MonitoringStack, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
        ) -> Iterator[tuple[RunMetrics, JobSummary]]:
    """The training job pushing to the Pushgateway, plus a second run served on /metrics and
    listed in the workers file_sd (so the worker-endpoint rule has its `up` series), and two GPU
    nodes' dcgm-exporter pages: the run's host (named in its file_sd entry) and another node."""
    served = RunMetrics(MetricsConfig(port=free_port()), SERVED_RUN, "raysubmit_served", 0, 1, RUN_HOST)
    host, port = served.server_address  # type: ignore[misc]
    monitoring_stack.set_worker_targets([f"{host}:{port}"])
    with serving(dcgm_exposition(RUN_HOST_GPUS, "3f2a9c0d1b7e")) as run_node, \
            serving(dcgm_exposition(OTHER_HOST_GPUS, "8c41d2e07a55")) as other_node:
        monitoring_stack.set_gpu_targets([{"targets": [f"127.0.0.1:{run_node}"], "labels": {"host": RUN_HOST}},
                                          {"targets": [f"{OTHER_HOST}:{other_node}"]}])
        metrics, summary = run_job_pushing_to(monitoring_stack, tmp_path_factory.mktemp("job"), RUN, "raysubmit_ops",
                                              RUN_HOST)
        try:
            wait_until(lambda: monitoring_stack.prometheus.query('up{job="fr_train_workers"} == 1'), 20,
                       "Prometheus to scrape the served worker")
            wait_until(lambda: len(monitoring_stack.prometheus.query('up{job="dcgm"} == 1')) == 2, 20,
                       "Prometheus to scrape both dcgm-exporter pages")
            yield metrics, summary
        finally:
            metrics.close(clean=True)
            served.close(clean=True)


def dashboard() -> dict[str, Any]:
    return json.loads(OPS_DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def grafana_to_promql(expr: str, run: str) -> str:
    """Substitute the dashboard's template variables as Grafana would for one run, all ranks."""
    for var in ("${datasource}", "$__range"):
        assert var not in expr, f"{OPS_DASHBOARD}: unsupported variable {var} in {expr}"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", run), "keep test run names free of regex characters"
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$run", run)
            .replace("$rank", ".*"))


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")


def with_bool_comparisons(expr: str) -> str:
    """Add `bool` to every comparison outside label matchers: the filter becomes 0/1 values, so
    the expression returns data whenever the series it compares exist, firing or not."""
    out, depth, i = [], 0, 0
    while i < len(expr):
        ch = expr[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == '"' and depth:  # a quoted label value
            j = expr.index('"', i + 1)
            out.append(expr[i : j + 1])
            i = j + 1
            continue
        if depth == 0:
            m = _COMPARISON.match(expr, i)
            if m:
                out.append(m.group(0) if m.group(2) else m.group(1) + " bool")
                i = m.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


# ------------------------------------------------------------------------------------------ promtool
def test_promtool_accepts_the_ops_config_and_rules() -> None:
    promtool = monitoring_binaries()["promtool"]
    for args in (["check", "config", str(OPS_PROMETHEUS)], ["check", "rules", str(OPS_ALERTS)]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


def test_promtool_accepts_the_derived_test_config_and_rules(monitoring_stack: MonitoringStack) -> None:  # noqa: F811
    for args in (["check", "config", str(monitoring_stack.config_path)],
                 ["check", "rules", str(monitoring_stack.rules_path)]):
        r = subprocess.run([monitoring_stack.promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


# ------------------------------------------------------------------------------------------ prometheus.yml
def test_prometheus_scrapes_the_pushgateway_with_honored_labels_the_workers_and_ray_file_sd() -> None:
    cfg = yaml.safe_load(OPS_PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert "file_sd_configs" in jobs["fr_train_workers"]
    assert cfg["rule_files"] == ["alerts.yml"]  # relative to the config: the file next to it
    assert json.loads((OPS_PROMETHEUS.parent / "workers.json").read_text()) == []


def test_the_running_prometheus_scrapes_the_pushgateway(monitoring_stack: MonitoringStack) -> None:  # noqa: F811
    def pushgateway_up() -> bool:
        return any(t["labels"]["job"] == "pushgateway" and t["health"] == "up"
                   for t in monitoring_stack.prometheus.targets())

    wait_until(pushgateway_up, 15, "the pushgateway target to be up")


# ------------------------------------------------------------------------------------------ dashboard
def test_dashboard_is_a_provisionable_grafana_dashboard_with_run_and_rank_selectors() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["query"]["query"] == "label_values(fr_train_step, run)"
    assert variables["rank"]["query"]["query"] == 'label_values(fr_train_step{run=~"$run"}, rank)'
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            if "rank" in t["expr"] and "$rank" not in t["expr"] and "by (run, rank)" not in t["expr"]:
                pytest.fail(f"panel {p['title']!r} mentions rank without the $rank selector: {t['expr']}")


def test_grafana_provisioning_points_at_the_dashboard_and_the_default_data_source() -> None:
    ds = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    prov = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "fr_train.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    readme = (OPS / "README.md").read_text()
    assert provider["options"]["path"] in readme, "ops/README.md must say where to copy the dashboard JSON"


def test_every_exported_metric_has_a_dashboard_panel() -> None:
    m = RunMetrics(MetricsConfig(), "names", "j", 0, 1, "h")
    names = {f.name for f in m.registry.collect()}
    exprs = " ".join(e for _, e in dashboard_targets())
    assert len(names) >= 25
    missing = sorted(n for n in names if not re.search(rf"\b{re.escape(n)}(_total|_sum|_count|_bucket)?\b", exprs))
    assert not missing, f"no dashboard panel queries {missing}"


def test_every_dashboard_query_returns_data_for_a_run(
    monitoring_stack: MonitoringStack, job: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    prom = monitoring_stack.prometheus
    empty = []
    for title, expr in dashboard_targets():
        q = grafana_to_promql(expr, RUN)
        if not finite(prom.query(q)):
            empty.append(f"{title}: {q}")
    assert not empty, "dashboard queries without data:\n  " + "\n  ".join(empty)


def test_the_gpu_row_shows_every_gpu_of_the_runs_host_and_no_other_nodes(
    monitoring_stack: MonitoringStack, job: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    prom = monitoring_stack.prometheus
    # The scrape's host label: the file_sd entry's own, else the target's address without the port.
    assert sorted(r["metric"]["host"] for r in prom.query('up{job="dcgm"}')) == sorted([RUN_HOST, OTHER_HOST])
    panels = {p["title"]: p for p in dashboard()["panels"]}
    for title, (field, scale) in GPU_PANELS.items():
        (target,) = panels[title]["targets"]
        got = {(r["metric"]["host"], r["metric"]["gpu"]): float(r["value"][1])
               for r in prom.query(grafana_to_promql(target["expr"], RUN))}
        assert got == {(RUN_HOST, str(g[0])): g[field] * scale for g in RUN_HOST_GPUS}, title
        assert "{{host}}" in target["legendFormat"] and "{{gpu}}" in target["legendFormat"], title


def test_rays_train_dashboard_is_generated_for_provisioning_and_linked(tmp_path: Path) -> None:
    written = subprocess.run([sys.executable, str(ROOT / "scripts" / "ray_dashboards.py"), str(tmp_path)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    train = json.loads((tmp_path / "ray_train.json").read_text())
    assert train["uid"] == "rayTrainDashboard" and "(uid rayTrainDashboard)" in written
    assert any("ray_train_" in t.get("expr", "") for p in train["panels"] for t in p.get("targets", []))
    (link,) = [link for link in dashboard()["links"] if "Ray Train" in link["title"]]
    assert link["url"] == f"/d/{train['uid']}"
    prov = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "ray.yml").read_text())
    (provider,) = prov["providers"]
    readme = (OPS / "README.md").read_text()
    assert provider["options"]["path"] in readme and "scripts/ray_dashboards.py" in readme


def test_dashboard_template_variables_list_the_run_and_its_rank(
    monitoring_stack: MonitoringStack, job: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    prom = monitoring_stack.prometheus
    assert RUN in prom.label_values("run", "fr_train_step")
    assert prom.label_values("rank", f'fr_train_step{{run=~"{RUN}"}}') == ["0"]


# ------------------------------------------------------------------------------------------ alerts
def test_comparisons_become_bool_outside_label_matchers() -> None:
    assert with_bool_comparisons('a{x!="1", y=~"a>b"} > 600') == 'a{x!="1", y=~"a>b"} > bool 600'
    assert with_bool_comparisons("up == 0") == "up == bool 0"
    assert with_bool_comparisons("a != a") == "a != bool a"
    assert with_bool_comparisons("a >= bool 1") == "a >= bool 1"


def test_every_alert_expression_returns_data_for_a_run(
    monitoring_stack: MonitoringStack, job: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    """Each rule's expression, its filter turned into 0/1, has series: the names exist as written."""
    prom = monitoring_stack.prometheus
    rules = alert_rules(yaml.safe_load(OPS_ALERTS.read_text()))
    assert {r["alert"] for r in rules} >= {"FrTrainRunStalled", "FrTrainThroughputDrop", "FrTrainLossNaN",
                                          "FrTrainSkippedStepsRising", "FrTrainCheckpointOverdue",
                                          "FrTrainWorkersRestarting"}
    empty = []
    for r in rules:
        q = with_bool_comparisons(r["expr"])
        if not finite(prom.query(q)):
            empty.append(f"{r['alert']}: {q}")
    assert not empty, "alert expressions without data:\n  " + "\n  ".join(empty)


def test_a_healthy_run_fires_no_alert_but_the_stall_one_once_it_stops(
    monitoring_stack: MonitoringStack, job: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    """Nothing but FrTrainRunStalled fires for the run, and that only once the last step is older
    than the (test-shortened) window."""
    _, summary = job

    def stalled() -> list[dict[str, Any]]:
        return [a for a in monitoring_stack.prometheus.alerts()
                if a["labels"]["alertname"] == "FrTrainRunStalled" and a["labels"].get("run") == RUN
                and a["state"] == "firing"]

    (alert,) = wait_until(stalled, STALL_AFTER_S + 20, "FrTrainRunStalled to fire")
    assert alert["labels"]["rank"] == "0" and alert["labels"]["severity"] == "critical"
    active_at = _parse_rfc3339(alert["activeAt"])
    assert active_at >= summary.last_step_at + STALL_AFTER_S - 1.5, "fired while the job was still stepping"
    # (FrTrainSkippedStepsRising may be pending: the job's first steps overflow on purpose; its
    # `for: 10m` keeps such a burst from firing.)
    others = [a["labels"]["alertname"] for a in monitoring_stack.prometheus.alerts()
              if a["labels"].get("run") == RUN and a["labels"]["alertname"] != "FrTrainRunStalled"
              and a["state"] == "firing"]
    assert not others, f"a healthy run fired {others}"


def test_a_cleanly_finished_run_leaves_the_pushgateway_and_clears_its_stall_alert(
    monitoring_stack: MonitoringStack, job: tuple[RunMetrics, JobSummary],  # noqa: F811
) -> None:
    metrics, _ = job
    metrics.close(clean=True)
    assert not [g for g in monitoring_stack.pushgateway_groups() if g.get("run") == RUN]

    def cleared() -> bool:
        return not [a for a in monitoring_stack.prometheus.alerts() if a["labels"].get("run") == RUN]

    wait_until(cleared, 15, "the run's alerts to clear after a clean finish")


def _parse_rfc3339(ts: str) -> float:
    """Prometheus' activeAt (e.g. 2026-01-01T10:00:00.123456789Z) as Unix seconds."""
    from datetime import datetime

    base, _, frac = ts.rstrip("Z").partition(".")
    seconds = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return seconds + (float(f"0.{frac}") if frac else 0.0)


def test_ops_readme_explains_how_to_start_point_and_import() -> None:
    readme = (OPS / "README.md").read_text()
    for needle in ("prometheus-pushgateway", "--config.file", "metrics.pushgateway=", "metrics.port=",
                   "fr_train.json", "install_monitoring.sh", "dcgm-exporter", "gpus.json"):
        assert needle in readme, f"ops/README.md does not mention {needle!r}"
