#!/bin/bash
# The built-in server benchmark (8.2, benchmarks/serve_gpu.py) under several settings in ONE device call, one after
# another on one GPU (later starts reuse the Triton cache, ~40 s), carrying .bench and .whl:
#
#   bash benchmarks/device_serve_variants.sh                      # the variants below
#   VARIANTS="default nogc" bash benchmarks/device_serve_variants.sh
#
# default: the server as shipped, --server-debug (per-forward issue time and the launching thread's CPU time)
# nogc:    --no-gc-freeze (A/B of freezing start-up objects out of the garbage collector)
# omp1:    OMP_NUM_THREADS=1 for the benchmark's client process too (does the client's OpenMP pool slow the server?)
# threads: --cpu-threads 16 (the server's torch CPU threads as before session 4)
# overhead4k: --batch-overhead-tokens 4096 (fewer, larger forwards)
# pyspy:   the server under `py-spy record --native --idle --threads` (hung at shutdown on the H200 machine)
# Each variant's JSON line is appended to $OUT/serve_variants.jsonl as it finishes (a call cut short still returns
# them); all logs go into ONE archive, $OUT/serve_variants.tar.gz (a call brings back few files).
set -u
cd "$(dirname "$0")/.."
S=$(date +%s)
OUT=${OUT:-/tmp/serve_variants_out}
LOGS=$(mktemp -d /tmp/serve_variants.XXXX)
source benchmarks/device_setup.sh > "$LOGS/setup.log" 2>&1
export PYTHONPATH=/tmp/fla:$PYTHONPATH
nvidia-smi -L
COMMON=(--server-debug --no-direct --warmup "${WARMUP:-256}")
mkdir -p "$OUT"
for v in ${VARIANTS:-default}; do
  args=()
  envs=()
  case $v in
    default) ;;
    nogc) args=(--server-args=--no-gc-freeze) ;;
    omp1) envs=(OMP_NUM_THREADS=1) ;;
    threads) args=(--server-args="--cpu-threads 16") ;;
    overhead4k) args=(--server-args="--batch-overhead-tokens 4096") ;;
    pyspy) args=(--server-prefix="/tmp/fla/bin/py-spy record --native --idle --threads --rate 100 --format raw -o $LOGS/pyspy_server.txt --") ;;
    *) echo "unknown variant $v"; continue ;;
  esac
  env "${envs[@]}" timeout -k 10 "${VARIANT_TIMEOUT:-400}" python3 benchmarks/serve_gpu.py "${COMMON[@]}" "${args[@]}" \
    --server-log "$LOGS/server_$v.log" > "$LOGS/serve_$v.json" 2> "$LOGS/serve_$v.err"
  echo "$v rc=$? ($(( $(date +%s) - S )) s)"
  pkill -f "mtptune-serve-gpu-hs" 2>/dev/null  # a server a killed benchmark left behind (its storage folder)
  sed "s/^{/{\"variant\": \"$v\", /" "$LOGS/serve_$v.json" | grep "^{" | tee -a "$OUT/serve_variants.jsonl"
done
tar -czf "$OUT/serve_variants.tar.gz" -C "$LOGS" .
echo "done ($(( $(date +%s) - S )) s)"
