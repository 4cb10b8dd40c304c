#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv/ on a fresh machine.
# torch is installed FIRST, pinned to the CPU wheel that lies on disk on our machines, so that
# no later dependency resolves `torch` to a multi-GB CUDA build. Idempotent: a stamp of
# pyproject.toml's hash skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-dev,dali}"
py="${PYTHON:-python3}"
torch_spec="${FR_TRAIN_TORCH:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.fr_train-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$extras-$torch_spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$torch_spec"
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "$want" > "$stamp"
echo "fr_train environment ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
