#!/usr/bin/env bash
# The GPU check: the one command to run on a machine with one or more NVIDIA GPUs and the project's
# environment (README: "Installing on a GPU cluster"). Target: <= 8 minutes on one H100/H200.
#   1. pytest -m gpu                         (DALI mixed decode, GPU checkpoints, Trainer bf16/fp16, head)
#   2. fr_train r50 arcface, synthetic 112x112, DALI mixed, 300 steps: loss falls, held-out accuracy
#      above raw pixels + 0.10, images/s and peak memory
#   3. a local Ray cluster on 127.0.0.1 and `ray job submit -- fr_train r100 vpl --max-steps 50`
#   4. one summary table (device, versions, figures) and OUT/gpu_check.json
# Without Ray installed, step 2 drives the same Trainer without Ray and step 3 is skipped (said so).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (default: ./gpu_check_out; PYTHON=... picks the interpreter)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3; }
out="$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"

"$py" scripts/gpu_check.py preflight || exit 1
status() { "$py" - "$out/status.json" "$1" "$2" <<'EOF'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1]); d = json.loads(p.read_text()) if p.is_file() else {}
d[sys.argv[2]] = int(sys.argv[3]) if sys.argv[3].lstrip("-").isdigit() else sys.argv[3]
p.write_text(json.dumps(d))
EOF
}
rm -f "$out/status.json"
has_ray=1; "$py" -c "import ray.train" 2>/dev/null || has_ray=0

echo "== 1/3 pytest -m gpu"
"$py" -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest.log" | tail -15
status pytest "${PIPESTATUS[0]}"

echo "== 2/3 r50 arcface, 300 steps, synthetic 112x112, DALI mixed"
train_args=(r50 arcface --set run.storage="$out/runs" --set run.name=gpu-check-r50 --set checkpoint.resume=never
  --set run.overwrite=true --set schedule.max_steps=300 --set data.batch_size=128 --set optimizer.lr=0.1 --set optimizer.base_batch=128
  --set schedule.warmup_steps=30 --set eval.every_steps=0 --set run.log_every=10 --set run.export_onnx=false
  --set data.cache_dir="$out/cache")
if [ "$has_ray" = 1 ]; then
  fr_train="$(dirname "$py")/fr_train"; [ -x "$fr_train" ] || fr_train=fr_train
  "$fr_train" "${train_args[@]}" --num-workers 1 > "$out/train.log" 2>&1
else
  echo "   (ray is not installed: the Trainer runs on cuda:0 without Ray)"
  "$py" scripts/gpu_check.py train "$out" -- "${train_args[@]}" > "$out/train.log" 2>&1
fi
status train "$?"; grep "\[fr_train\] \(eval\|done\|step 300\)" "$out/train.log" | tail -4

echo "== 3/3 ray job submit -- fr_train r100 vpl --max-steps 50"
if [ "$has_ray" = 1 ]; then
  ray="$(dirname "$py")/ray"; [ -x "$ray" ] || ray=ray
  tmp="$(mktemp -d /tmp/rayg.XXXX)"; port=$((20000 + RANDOM % 20000)); dash=$((port + 1))
  "$ray" start --head --node-ip-address 127.0.0.1 --port "$port" --dashboard-host 127.0.0.1 \
    --dashboard-port "$dash" --temp-dir "$tmp" --disable-usage-stats > "$out/ray_start.log" 2>&1
  "$ray" job submit --address "http://127.0.0.1:$dash" -- "$(dirname "$py")/fr_train" r100 vpl --max-steps 50 \
    --num-workers 1 --storage "$out/runs" --name gpu-check-ray --set checkpoint.resume=never --set run.overwrite=true \
    --set data.cache_dir="$out/cache" --set head.vpl_start_iter=10 --set run.log_every=10 \
    --set eval.every_steps=0 --set run.export_onnx=false > "$out/ray_job.log" 2>&1
  status ray "$?"
  "$ray" stop --force > /dev/null 2>&1; rm -rf "$tmp"
else
  echo "   skipped: ray is not installed in this environment"; status ray skipped
fi

echo "== summary"
"$py" scripts/gpu_check.py report "$out" | tee "$out/summary.md"
exit "${PIPESTATUS[0]}"
