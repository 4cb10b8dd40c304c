#!/usr/bin/env bash
# The quickstart (README): set up .venv, then train on the embedded default (synthetic
# identities, a local Ray cluster, CPU workers) and print verification accuracy.
# Extra arguments go to fr_train (e.g. `bash scripts/quickstart.sh --max-steps 50`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh dev,dali
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
# A CPU-sized run, every choice explicit: 64x64 synthetic crops (~3x cheaper than 112), 2 workers
# of 32 images, 240 steps, held-out verification at the start and at the end (~5 min on 2 cores).
exec .venv/bin/fr_train mbf arcface --storage "$root/runs" --num-workers 2 --max-steps 240 \
  --set data.synthetic.image_size=64 --set data.batch_size=32 \
  --set optimizer.lr=0.2 --set optimizer.base_batch=64 --set schedule.warmup_steps=20 \
  --set eval.every_steps=0 --set run.log_every=20 "$@"
