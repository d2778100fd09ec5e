#!/bin/bash
# One device call: the peer (speculators 0.9.0, benchmarks/peer/device_run.sh) and mtptune's trainer on the SAME
# fake Qwen3.5-9B verifier and fixed-seed offline data, then mtptune's JSON line (with the peer's numbers beside it).
# Needs the carried wheel folder .bench/whl (see docs/benchmarks.md). Run from the repo root on the device.
set -u
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/bench_out}
W=/tmp/bench
source benchmarks/device_setup.sh
mkdir -p $OUT
if [ "${SKIP_PEER:-0}" != "1" ]; then
  BENCH_N_SAMPLES=${BENCH_N_SAMPLES:-200} BENCH_BUDGET_S=${PEER_BUDGET_S:-300} BENCH_EXTRA="" BENCH_PROFILE_STEP=-1 \
    OUT=$OUT bash benchmarks/peer/device_run.sh > $OUT/peer_log.txt 2>&1
  grep -E "^SUM|rc=|Error" $OUT/peer_log.txt | head -30
else
  mkdir -p $W && python3 benchmarks/peer/make_fake_verifier.py $W/verifier > /dev/null &&
    python3 benchmarks/peer/make_offline_data.py $W/data $W/hs --num-samples ${BENCH_N_SAMPLES:-200} | tail -1
fi
echo "== mtptune ($(elapsed)s)"
python3 benchmarks/train_step.py --verifier $W/verifier --data $W/data --hidden-states $W/hs \
  --peer ${PEER_SUMMARY:-$OUT/runA/summary.json} ${TRAIN_STEP_ARGS:-} 2>&1 | tee $OUT/train_step_log.txt | grep -E "^\{|Error|error" | tail -5
echo "== done ($(elapsed)s)"
