#!/bin/bash
# Issue 8's trainer, server and GPU-test measurements in ONE call of a 2-GPU device machine (nvidia-h200-x2 or
# nvidia-h100-x2), carrying .bench and .whl (docs/benchmarks.md, "Re-running the device benchmarks"):
#
#   bash benchmarks/device_issue8.sh                 # ~6 min on a fresh machine
#
# GPU 1: the peer (speculators 0.9.0) then mtptune's trainer step on the same files (8.1, with a kernel profile).
# GPU 1: then the GPU test suite (8.4, without flash-linear-attention importable).
# GPU 0: the built-in server at concurrency 32 with its per-forward debug log (8.2), under each of $SERVE_VARIANTS
#        (benchmarks/device_serve_variants.sh; default "default").
# JSON lines go to $OUT/issue8.jsonl and $OUT/serve_variants.jsonl as each part finishes (a call cut short still
# returns them); logs go into two archives, $OUT/issue8_logs.tar.gz and $OUT/serve_variants.tar.gz: a call brings
# back only a few files from $OUT (8 in 2026-11), and the rest is lost.
# Knobs: SERVE_VARIANTS, SKIP_TESTS=1, SKIP_PEER=1.
set -u
cd "$(dirname "$0")/.."
S=$(date +%s)
elapsed() { echo $(( $(date +%s) - S )); }
OUT=${OUT:-/tmp/issue8_out}
LOGS=$(mktemp -d /tmp/issue8_logs.XXXX)
source benchmarks/device_setup.sh > "$LOGS/setup.log" 2>&1
nvidia-smi -L

mkdir -p "$OUT"
(
  export CUDA_VISIBLE_DEVICES=1
  SKIP_PEER=${SKIP_PEER:-0} BENCH_N_SAMPLES=300 PEER_BUDGET_S=240 OUT=$LOGS \
    TRAIN_STEP_ARGS="--profile $LOGS/train_profile.txt" bash benchmarks/device_train_step.sh > "$LOGS/train_step.log" 2>&1
  grep -h "^{" "$LOGS/train_step.log" >> "$OUT/issue8.jsonl"
  echo "8.1 done ($(elapsed) s)"
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 200 python3 -m pytest -m gpu tests/gpu -q -rA > "$LOGS/gpu_tests.log" 2>&1
    echo "8.4 rc=$? ($(elapsed) s)"
    tail -3 "$LOGS/gpu_tests.log" > "$OUT/gpu_tests_tail.txt"
  fi
) &
(
  export CUDA_VISIBLE_DEVICES=0
  VARIANTS="${SERVE_VARIANTS:-default}" OUT=$OUT bash benchmarks/device_serve_variants.sh > "$LOGS/serve.log" 2>&1
  echo "8.2 done ($(elapsed) s)"
) &
wait
cat "$OUT/issue8.jsonl" "$OUT/serve_variants.jsonl" 2>/dev/null
cat "$OUT/gpu_tests_tail.txt" 2>/dev/null
tar -czf "$OUT/issue8_logs.tar.gz" -C "$LOGS" .
echo "done ($(elapsed) s): $OUT/issue8.jsonl, $OUT/issue8_logs.tar.gz"
