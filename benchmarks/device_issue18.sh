#!/bin/bash
# Issue 18 on one GPU (one call of ~9.5 minutes on an H200; carry .bench and .whl):
#   1. an import-time profile of the trainer (the start-up before any work);
#   2. the epoch-end checkpoint stop (benchmarks/checkpoint_snapshot.py; SKIP_SNAPSHOT=1 skips it) and
#      (SKIP_FORWARD=0) the colocated verifier forward alone (benchmarks/colocated_forward.py);
#   3. the headline job from process start to checkpoint_best: a 2-step colocated warm-up that fills the compile
#      and autotuning caches (the README's recipe), then the timed colocated job. Server mode needs a call of its
#      own (a cold server's kernel warm-up alone took 170-215 s): MODES=server-warmup,server SKIP_SNAPSHOT=1 runs the
#      same recipe against a server started with the trainer (filling the server's and the trainer's caches), then
#      times the server job as on a machine that served and trained before.
# Every JSON line lands in $OUT as soon as it exists; logs go into one archive at the end.
# MODES (default "warmup,colocated"), FRACTION (default 1), BUDGET_S (the pipeline's, default 510).
set -u
source benchmarks/device_setup.sh
export PYTHONPATH=/tmp/fla:$PYTHONPATH  # flash-linear-attention for the verifier's Gated DeltaNet layers
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/logs18
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, fla; print('torch', torch.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__)" | tee -a "$OUT/gpu.txt"
python3 -X importtime -c "import mtptune.cli.main, mtptune.training.train, mtptune.serving.colocated" 2> /tmp/logs18/importtime.txt
if [ "${SKIP_SNAPSHOT:-0}" != 1 ]; then  # the epoch-end checkpoint stop (pinned copies, parallel file writes), ~40 s
  timeout 120 python3 benchmarks/checkpoint_snapshot.py > "$OUT/checkpoint_snapshot.json" 2> /tmp/logs18/checkpoint_snapshot.log
  tail -c 600 "$OUT/checkpoint_snapshot.json"
fi
if [ "${SKIP_FORWARD:-1}" != 1 ]; then
  timeout 120 python3 benchmarks/colocated_forward.py --rows "${FORWARD_ROWS:-800}" > "$OUT/colocated_forward.json" 2> /tmp/logs18/colocated_forward.log
  tail -c 600 "$OUT/colocated_forward.json"
fi
python3 benchmarks/online_pipeline.py --modes "${MODES:-warmup,colocated}" --fraction "${FRACTION:-1}" \
  --server-gpu 0 --trainer-gpu 0 --time-budget-s "${BUDGET_S:-510}" --out "$OUT/online_pipeline.json" \
  --log-dir /tmp/logs18 2> /tmp/logs18/online_pipeline.stderr | tail -c 3000
tar czf "$OUT/issue18_logs.tar.gz" -C /tmp logs18 2>/dev/null
ls -la "$OUT"
