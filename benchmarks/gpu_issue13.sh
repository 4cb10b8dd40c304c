#!/usr/bin/env bash
# The prepared GPU run of issue 13 (throughput, memory, checkpoint stall), for a session that is lent
# one H100/H200: one command, each part under its own time limit (about 8 minutes in all), every
# figure as JSON under OUT (default ./gpu_issue13_out) plus the tables on stdout for RESULTS.md.
#   1. pytest -m gpu on the files this issue changed (bf16 autocast Trainer, pinned checkpoint staging)
#   2. benchmarks/train_step.py --device cuda: the issue's rows vs the arcface_torch-style baseline
#   3. benchmarks/head.py --fit-classes 30000000 --rate 0.05 --device cuda: the 30M-classes-with-VPL
#      claim, peak of the CUDA allocator (construction + 3 steps), against 80 GB minus the r100 reserve
#   4. benchmarks/checkpoint.py --device cuda --backbone r100 --classes 2000000: first and steady stall
# Needs torch with CUDA and deepspeed (a 2 MB wheel: DEVELOPERS.md); DALI and Ray are not used.
# Usage: bash benchmarks/gpu_issue13.sh [OUT]   (PYTHON=... picks the interpreter)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3; }
out="$(mkdir -p "${1:-gpu_issue13_out}" && cd "${1:-gpu_issue13_out}" && pwd)"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is the GPU run')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its output, record its exit status
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${SECONDS}s" | tee -a "$out/status.txt"
  grep -v '^{' "$out/$name.log" | tail -25
  echo "   ($((SECONDS - t0)) s)"
}
rm -f "$out/status.txt"

part pytest_gpu 150 "$py" -m pytest -q -m gpu tests/test_gpu_trainer.py tests/test_checkpoint_gpu.py
part train_step 170 "$py" benchmarks/train_step.py --device cuda --warmup 3 --steps 10 \
  --json-out "$out/train_step_cuda.json"
part head_fit_30m 90 "$py" benchmarks/head.py --fit-classes 30000000 --rate 0.05 --device cuda --budget-gb 80
grep '^{' "$out/head_fit_30m.log" > "$out/head_fit_30m.json"
part checkpoint_2m 110 "$py" benchmarks/checkpoint.py --device cuda --backbone r100 --classes 2000000 --idle-steps 3
grep '^{' "$out/checkpoint_2m.log" > "$out/checkpoint_2m.json"
cat "$out/status.txt"
! grep -q "rc=[1-9]" "$out/status.txt"
