#!/bin/bash
# One speculators 0.9.0 training run on prepared offline data, summarized into ONE JSON line (stdout, last line):
#
#   bash benchmarks/peer/peer_run.sh NAME VERIFIER DATA HS RUN_DIR [--real-tokens-from STEPS] -- [speculators args]
#
# The MTP settings of issue 8.1 (K=3, beta 0.6, --total-seq-len 8192, 1 epoch, lr 1e-4, the peer's other defaults:
# Muon + AdamW, log-freq 1) plus the extra speculators args after `--` (e.g. --log-freq 10, --optimizer adamw). The run
# stops after its last logged training step (no checkpoint, no validation: not measured). RUN_DIR gets steps.jsonl,
# train_log.txt and summary.json (benchmarks/peer/summarize_run.py: the three throughput measures). Needs
# benchmarks/device_setup.sh sourced (speculators importable).
set -u
S=$(dirname "$0")
NAME=$1 VERIFIER=$2 DATA=$3 HS=$4 DIR=$5
shift 5
SUMMARY_ARGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SUMMARY_ARGS+=("$1"); shift; done
[ $# -gt 0 ] && shift
mkdir -p "$DIR"
T0=$(date +%s)
# Under a time limit of PART_LIMIT_S (set by device_issue19.sh) less 20 s, so that a run cut short is still
# summarized from the steps it logged.
BENCH_DIR=$DIR BENCH_PROFILE_STEP=-1 BENCH_EXIT_AT_EPOCH_END=1 timeout -k 5 $(( ${PART_LIMIT_S:-100000} - 20 )) \
  python3 "$S/run_train_hooked.py" \
  --verifier-name-or-path "$VERIFIER" --data-path "$DATA" --hidden-states-path "$HS" --on-missing raise \
  --speculator-type mtp --num-speculative-steps 3 --step-weight-beta 0.6 --epochs 1 --lr 1e-4 --total-seq-len 8192 \
  --save-path "/tmp/peer_ckpt_$NAME" "$@" > "$DIR/train_log.txt" 2>&1
RC=$?
python3 "$S/summarize_run.py" "$DIR" --seq-len 8192 --out "$DIR/summary.json" "${SUMMARY_ARGS[@]}" > /dev/null 2>&1
python3 - "$NAME" "$DIR/summary.json" "$RC" "$(( $(date +%s) - T0 ))" "$*" <<'EOF'
import json, sys
from pathlib import Path

name, path, rc, wall, extra = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
line = {"benchmark": "peer_train_step", "label": name, "peer": "speculators 0.9.0", "args": extra, "rc": rc, "wall_s": wall}
if path.exists():
    d = json.loads(path.read_text())
    setup = d.get("setup") or {}
    line.update(
        optimizers=setup.get("optimizers"),
        real_tokens_per_s=(d.get("tokens_per_s") or {}).get("median"),
        step_ms=(d.get("step_ms") or {}).get("median"),
        opt_ms=(d.get("opt_ms") or {}).get("median"),
        peak_memory_gib=d.get("peak_mem_alloc_gib"),
        logged_steps=d.get("logged_steps"),
        first_step_ms_incl_compile=d.get("first_step_ms_incl_compile"),
        throughput=d.get("throughput"),
        device=setup.get("cuda_device"),
        torch=setup.get("torch"),
    )
else:
    line["error"] = "no summary (the run failed: see train_log.txt)"
print(json.dumps(line))
EOF
