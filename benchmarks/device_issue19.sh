#!/bin/bash
# Issue 19's measurements in ONE call of one H200 (`nvidia-h200`), carrying .bench and .whl (built here by
# `bash benchmarks/device_wheels.sh`):
#
#   bash benchmarks/device_issue19.sh          # ~9 min; stops itself at BUDGET_S (default 550 s)
#
# Parts, in order of priority. Each runs under `timeout` (its cap, or what is left of the budget if less) and is
# skipped, with a {"part": ..., "skipped": true} line, when less than its minimum is left; so one slow part cannot eat
# the call. Estimated from docs/benchmarks.md (H200: peer 95 s cold, mtptune 73 s cold; later runs hit the compile
# caches):                                                                        estimate   cap
#   1. (LOSS_KERNELS_AB=1 only: measured 2026-12-02) loss-kernel A/B at the 8.1 shapes (benchmarks/loss_kernels.py)
#                                                                                  ~80 s    150 s
#   2. GPU tests of the loss paths (tests/gpu/test_fused_loss.py)                  ~40 s     90 s
#   3. peer (speculators 0.9.0) on the 8.1 rows, its defaults (Muon, log-freq 1)   ~95 s    150 s
#   4. mtptune, same files, AdamW and --loss-kernel auto (the defaults: liger where installed); kernel table of 5
#      steps after the window                                                      ~70 s    120 s
#   5. mtptune, same files, --loss-kernel $LIBRARY_KERNELS (default "ours"): the step-level A/B beside 4
#                                                                                  ~45 s     90 s
#   6. mtptune, same files, Muon: the same-optimizer row beside 3                  ~45 s     90 s
#   7. peer on GSM8K-length rows (mean ~202 tokens), defaults                      ~65 s    120 s
#   8. mtptune on the same GSM8K-length files                                      ~45 s     90 s
#   9. peer on the 8.1 rows with --log-freq 10 (its per-step device syncs off)     ~60 s    110 s
#  10. while time is left: the A/B at the GSM8K shapes, the A/B's other variants (ours-c4096, liger-c1), the peer
#      with --optimizer adamw --log-freq 10.
# Expected: parts 2-9 ~510 s, so 9 may be cut short (its summary still comes back) and 10 mostly skipped.
# The fake verifier and both data sets are written on the CPU in the background while 1 and 2 run.
# Every JSON line goes to $OUT/issue19.jsonl as soon as it is printed; all logs, the peer's step records and the
# kernel table go into $OUT/issue19_logs.tar.gz at the end (a call brings back only ~8 files of $OUT).
# PEER_STEPS=FILE: the log-freq-1 peer run's steps.jsonl whose real-token counts the log-freq-10 rows use (default
# this call's peer_long; the same seeded data makes another call's file valid). ROWS_GSM8K=0 skips that data set.
# SKIP="name ..." skips parts by name (e.g. SKIP="gpu_tests mtptune_long_muon" for rows measured before).
# Knobs for a smoke run of this script on a CPU box (tiny shapes; the peer is skipped where speculators is missing):
# DATA_ARGS="--tiny", ROWS_LONG, ROWS_GSM8K, TRAIN_ARGS="--steps 4 --log-every 2 ...", LK_ARGS="--hidden 64 ...".
set -u
cd "$(dirname "$0")/.."
S=$(date +%s)
BUDGET=${BUDGET_S:-550}
RESERVE=15  # the archive at the end
elapsed() { echo $(( $(date +%s) - S )); }
OUT=${OUT:-/tmp/issue19_out}
LOGS=$(mktemp -d /tmp/issue19_logs.XXXX)
W=/tmp/bench19
J=$OUT/issue19.jsonl
mkdir -p "$OUT" "$W"
note() { echo "$*" | tee -a "$LOGS/timeline.txt"; }

# part NAME MIN_S CAP_S CMD...: CMD under a time limit; its JSON lines (lines starting with "{") go to $J as printed.
part() {
  local name=$1 min=$2 cap=$3
  shift 3
  case " ${SKIP:-} " in *" $name "*)
    note "SKIP $name: in \$SKIP"
    echo "{\"part\": \"$name\", \"skipped\": \"SKIP\"}" >> "$J"
    return 1;;
  esac
  local t=$(( BUDGET - $(elapsed) - RESERVE ))
  [ $t -gt "$cap" ] && t=$cap
  if [ $t -lt "$min" ]; then
    note "SKIP $name: ${t}s left of the budget, it needs ${min}s"
    echo "{\"part\": \"$name\", \"skipped\": true, \"seconds_left\": $t}" >> "$J"
    return 1
  fi
  note "== $name (limit ${t}s, at $(elapsed)s)"
  PART_LIMIT_S=$t timeout -k 10 "$t" "$@" 2>&1 | tee "$LOGS/$name.log" | grep --line-buffered '^{' >> "$J"
  local rc=${PIPESTATUS[0]}
  note "   $name rc=$rc at $(elapsed)s"
  return "$rc"
}

source benchmarks/device_setup.sh > "$LOGS/setup.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$LOGS/timeline.txt"
echo "{\"part\": \"setup\", \"seconds\": $(elapsed), \"cannot_import\": \"${DEVICE_SETUP_MISSING}\"}" >> "$J"
grep -E "MISSING|INCOMPLETE|!!!" "$LOGS/setup.log" | tee -a "$LOGS/timeline.txt"
PEER_OK=1
case " $DEVICE_SETUP_MISSING " in *" speculators.train.cli "*) PEER_OK=0;; esac
[ -d .bench/whl ] || PEER_OK=0
[ $PEER_OK = 1 ] || note "the peer (speculators) is not importable: its parts are skipped"
# DataLoader workers hand 64 MiB packed batches to the peer's trainer through /dev/shm
SHM_KB=$(df -k /dev/shm 2>/dev/null | tail -1 | awk '{print $2}')
if command -v nvidia-smi > /dev/null && [ -n "$SHM_KB" ] && [ "$SHM_KB" -lt 16000000 ]; then
  mount -o remount,size=32G /dev/shm || true
fi

# The workload, on the CPU while the GPU runs parts 1-2: verifier, 8.1 rows (400: ~45 packed steps), GSM8K-length
# rows (1500: ~37 steps).
(
  set -e
  python3 benchmarks/peer/make_fake_verifier.py $W/verifier --device cpu ${DATA_ARGS:-}
  python3 benchmarks/peer/make_offline_data.py $W/long $W/long_hs --num-samples ${ROWS_LONG:-400} --device cpu \
    ${DATA_ARGS:-}
  [ "${ROWS_GSM8K:-1500}" = 0 ] || python3 benchmarks/peer/make_offline_data.py $W/gsm8k $W/gsm8k_hs \
    --num-samples ${ROWS_GSM8K:-1500} --lengths gsm8k --device cpu ${DATA_ARGS:-}
) > "$LOGS/data.log" 2>&1 &
DATA_PID=$!

# Measured on 2026-12-02 (benchmarks/results/loss_kernels_h200_20261202.jsonl): LOSS_KERNELS_AB=1 repeats it.
[ "${LOSS_KERNELS_AB:-0}" = 1 ] && part loss_kernels 60 150 python3 benchmarks/loss_kernels.py --mix long \
  --variants ours,liger,ours-ligerce,cce,cce-filter ${LK_ARGS:-}
part gpu_tests 30 90 python3 -m pytest -m gpu tests/gpu/test_fused_loss.py -q -rA -s
tail -3 "$LOGS/gpu_tests.log" > "$OUT/gpu_tests_tail.txt" 2>/dev/null
echo "{\"part\": \"gpu_tests\", \"summary\": \"$(tail -1 "$LOGS/gpu_tests.log" 2>/dev/null | tr -d '"=')\"}" >> "$J"

wait $DATA_PID
DATA_RC=$?
note "data rc=$DATA_RC at $(elapsed)s: $(grep -h 'offline data written' "$LOGS/data.log" | cut -c1-160 | tr '\n' ' ')"
if [ $DATA_RC != 0 ]; then
  note "no workload: the training parts are skipped"
  PEER_OK=0
fi
TRAIN=(python3 benchmarks/train_step.py --verifier $W/verifier ${TRAIN_ARGS:-})
LONG=(--data $W/long --hidden-states $W/long_hs --mix long)
SHORT=(--data $W/gsm8k --hidden-states $W/gsm8k_hs --mix gsm8k)
PEER=(bash benchmarks/peer/peer_run.sh)
if [ $DATA_RC = 0 ]; then
  [ $PEER_OK = 1 ] && part peer_long 90 150 "${PEER[@]}" peer_long $W/verifier $W/long $W/long_hs "$LOGS/peer_long" --
  part mtptune_long_adamw 60 120 "${TRAIN[@]}" "${LONG[@]}" --label adamw --peer "$LOGS/peer_long/summary.json" \
    --profile "$LOGS/train_profile.txt"
  cp "$LOGS/train_profile.txt" "$OUT/" 2>/dev/null
  for K in ${LIBRARY_KERNELS:-ours}; do  # the step-level A/B of the library kernel, beside the row above
    part "mtptune_long_$K" 40 90 "${TRAIN[@]}" "${LONG[@]}" --label "adamw_$K" --loss-kernel "$K" \
      --peer "$LOGS/peer_long/summary.json"
  done
  part mtptune_long_muon 40 90 "${TRAIN[@]}" "${LONG[@]}" --label muon --optimizer muon \
    --peer "$LOGS/peer_long/summary.json"
  [ $PEER_OK = 1 ] && part peer_gsm8k 60 120 "${PEER[@]}" peer_gsm8k $W/verifier $W/gsm8k $W/gsm8k_hs "$LOGS/peer_gsm8k" --
  part mtptune_gsm8k_adamw 40 90 "${TRAIN[@]}" "${SHORT[@]}" --label adamw --peer "$LOGS/peer_gsm8k/summary.json"
  [ $PEER_OK = 1 ] && part peer_long_logfreq10 60 150 "${PEER[@]}" peer_long_logfreq10 $W/verifier $W/long $W/long_hs \
    "$LOGS/peer_long_logfreq10" --real-tokens-from "${PEER_STEPS:-$LOGS/peer_long/steps.jsonl}" -- --log-freq 10
fi
part loss_kernels_gsm8k 30 60 python3 benchmarks/loss_kernels.py --mix gsm8k --variants ours,liger,cce,ours-ligerce \
  ${LK_ARGS:-}
part loss_kernels_more 30 60 python3 benchmarks/loss_kernels.py --mix long --variants ours,ours-c4096,liger-c1 ${LK_ARGS:-}
if [ $DATA_RC = 0 ] && [ $PEER_OK = 1 ]; then
  part peer_long_adamw_logfreq10 60 150 "${PEER[@]}" peer_long_adamw_logfreq10 $W/verifier $W/long $W/long_hs \
    "$LOGS/peer_long_adamw_logfreq10" --real-tokens-from "${PEER_STEPS:-$LOGS/peer_long/steps.jsonl}" -- --log-freq 10 \
    --optimizer adamw
fi

note "done at $(elapsed)s"
cat "$J"
tar -czf "$OUT/issue19_logs.tar.gz" -C "$LOGS" . 2>/dev/null
echo "done ($(elapsed)s): $(ls "$OUT" | tr '\n' ' ')"
