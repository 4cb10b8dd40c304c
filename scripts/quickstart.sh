#!/usr/bin/env bash
# The quickstart (README): set up .venv, then train on the embedded default (synthetic
# identities, a local Ray cluster, CPU workers) and print verification accuracy.
# Extra arguments go to fr_train (e.g. `bash scripts/quickstart.sh --max-steps 50`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh dev,dali
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
exec .venv/bin/fr_train "${FR_TRAIN_QUICKSTART_BACKBONE:-mbf}" arcface --storage "$root/runs" "$@"
