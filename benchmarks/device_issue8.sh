#!/bin/bash
# Issue 8's trainer, server and GPU-test measurements in ONE call of a 2-GPU device machine (nvidia-h200-x2 or
# nvidia-h100-x2), carrying .bench and .whl (docs/benchmarks.md, "Re-running the device benchmarks"):
#
#   bash benchmarks/device_issue8.sh                 # ~6 min on a fresh machine
#
# GPU 1: the peer (speculators 0.9.0) then mtptune's trainer step on the same files (8.1, with a kernel profile).
# GPU 0: the built-in server at concurrency 32 with its per-forward debug log (8.2), then the GPU test suite (8.4,
#        without flash-linear-attention importable).
# Prints the JSON lines and the test summary; everything else goes into ONE archive, $OUT/issue8_logs.tar.gz: a call
# brings back only a few files from $OUT (8 in 2026-11), and the rest is lost.
# Knobs: SERVER_ARGS (extra `mtptune serve` flags for 8.2, e.g. "--cudnn"), SKIP_TESTS=1, SKIP_PEER=1.
set -u
cd "$(dirname "$0")/.."
S=$(date +%s)
elapsed() { echo $(( $(date +%s) - S )); }
OUT=${OUT:-/tmp/issue8_out}
LOGS=$(mktemp -d /tmp/issue8_logs.XXXX)
source benchmarks/device_setup.sh > "$LOGS/setup.log" 2>&1
nvidia-smi -L

(
  export CUDA_VISIBLE_DEVICES=1
  SKIP_PEER=${SKIP_PEER:-0} BENCH_N_SAMPLES=300 PEER_BUDGET_S=240 OUT=$LOGS \
    TRAIN_STEP_ARGS="--profile $LOGS/train_profile.txt" bash benchmarks/device_train_step.sh > "$LOGS/train_step.log" 2>&1
  echo "8.1 done ($(elapsed) s)"
) &
SERVE_EXTRA=()
[ -n "${SERVER_ARGS:-}" ] && SERVE_EXTRA=(--server-args="$SERVER_ARGS")
(
  export CUDA_VISIBLE_DEVICES=0
  PYTHONPATH=/tmp/fla:$PYTHONPATH timeout 330 python3 benchmarks/serve_gpu.py --no-direct --server-debug \
    --server-log "$LOGS/server.log" "${SERVE_EXTRA[@]}" > "$LOGS/serve_gpu.json" 2> "$LOGS/serve_gpu.err"
  echo "8.2 rc=$? ($(elapsed) s)"
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 200 python3 -m pytest -m gpu tests/gpu -q -rA > "$LOGS/gpu_tests.log" 2>&1
    echo "8.4 rc=$? ($(elapsed) s)"
  fi
) &
wait
mkdir -p "$OUT"
grep -h "^{" "$LOGS/train_step.log" "$LOGS/serve_gpu.json" 2>/dev/null | tee "$OUT/issue8.jsonl"
tail -2 "$LOGS/gpu_tests.log" 2>/dev/null
tar -czf "$OUT/issue8_logs.tar.gz" -C "$LOGS" .
echo "done ($(elapsed) s): $OUT/issue8.jsonl, $OUT/issue8_logs.tar.gz"
