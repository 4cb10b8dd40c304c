#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv on a fresh machine, then run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k head`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh dev,dali
# The monitoring tests run a real Prometheus and Pushgateway (Debian packages).
bash scripts/install_monitoring.sh
# DeepSpeed JIT-compiles a small CPU op the first time; keep it in a cache that survives runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
export PYTHONUNBUFFERED=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
