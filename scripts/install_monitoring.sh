#!/usr/bin/env bash
# Install Prometheus (+ promtool) and the Pushgateway from Debian/Ubuntu packages if missing.
# Idempotent: does nothing when both binaries are already on PATH. The test suite's monitoring
# fixtures (tests/monitoring.py) start these binaries themselves on free ports; the packaged
# system services are not needed (and are not started where systemd is absent, e.g. containers).
set -euo pipefail

have_all() {
    command -v prometheus >/dev/null 2>&1 \
        && command -v promtool >/dev/null 2>&1 \
        && { command -v prometheus-pushgateway >/dev/null 2>&1 || command -v pushgateway >/dev/null 2>&1; }
}

if have_all; then
    echo "install_monitoring: prometheus, promtool and the pushgateway are already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_monitoring: apt-get not found; install Prometheus (with promtool) and the Pushgateway" \
         "from https://prometheus.io/download/ and put them on PATH" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_monitoring: must run as root (or with sudo available) to apt-get install" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends prometheus prometheus-pushgateway

if ! have_all; then
    echo "install_monitoring: packages installed but prometheus/promtool/prometheus-pushgateway" \
         "are still not on PATH" >&2
    exit 1
fi
echo "install_monitoring: $(prometheus --version 2>&1 | head -n1)"
echo "install_monitoring: $( (prometheus-pushgateway --version 2>&1 || pushgateway --version 2>&1) | head -n1)"
