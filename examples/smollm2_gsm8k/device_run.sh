#!/bin/bash
# The SmolLM2-135M-Instruct + GSM8K example (run.py) at full size on a GPU device machine, in two calls to the same
# warm machine (the 98 MB GGUF is over one call's 64 MiB; examples/smollm2_gsm8k/make_device_carry.sh splits it).
#
#   call 1, carry .bench .smol/a:  source benchmarks/device_setup.sh && bash examples/smollm2_gsm8k/device_run.sh preflight
#   call 2, carry .smol/b:         source benchmarks/device_setup.sh && bash examples/smollm2_gsm8k/device_run.sh
#
# setup (~30 s, instead of preflight): installs the gguf wheel, checks the imports and .smol/a/part-a; nothing else.
# preflight (~3-4 min incl. the wheel installs): installs the carried gguf wheel into /tmp/site, checks every import the run needs, then
#   device_preflight.py runs the whole pipeline on a random-weight SmolLM2 (GSM8K-length token-id prompts, same
#   server/trainer/eval settings): every CUDA path runs once, the compile caches in /tmp get warm, and
#   $OUT/preflight.json holds the measured times + a projection for the full run (choose EPOCHS etc. from it).
# run (default): reassembles the GGUF from .smol/a/part-a + .smol/b/part-b (size + sha256 checked against
#   .smol/a/manifest.env), then run.py --device cuda with --time-budget BUDGET_S; results.json, results.png,
#   logs.tar.gz and device_run.log are (re)written in $OUT after every step, so a kill still returns them.
#   The work dir (/tmp/smol_gsm8k) survives on a warm machine: a further call with other knobs (LOSS, EPOCHS, LR,
#   ...) reuses the converted verifier, the regenerated answers and the hidden-state cache, and trains + evaluates
#   only (~4-6 min).
#
# Knobs (environment; defaults = the full run): ANSWERS=4 (greedy + 3 sampled per training question) TEMP=0.8
#   TOP_P=0.95 MAX_TOKENS=256 EPOCHS=6 LR=1.5e-3 LOSS=kl INIT=random SEQ_LEN=8192 TRAIN_ARGS="--warmup-steps 30"
#   TRAIN_SAMPLES=0 (all 1,119) TEST_SAMPLES=200 GEN_SAMPLES=50 MTB_SAMPLES=80 EVAL_MAX_TOKENS=128 BUDGET_S=540
#   RESERVE_TRAIN_S=180 RESERVE_EVAL_S=135 SERVER_ROWS=1024 CONCURRENCY=2048 NAME= EXTRA_ARGS= WORK=/tmp/smol_gsm8k
#   DEVICE=cuda HARD_TIMEOUT_S=572 (run.py gets SIGTERM then: it stops its steps and publishes; preflight: 420);
#   TINY=1 shrinks everything to a CPU-sized smoke run (with DEVICE=cpu, PYTHON=..., OUT=...).
#
# Measured on one H200 with these defaults (2026-11-28, session 4, docs/results.md; held-out GSM8K AL 2.69 offline,
# 2.75 in real speculative decoding): server 38, greedy 64 (1,319 answers, 1,024 rows per decode), sampled 90
# (3,357 answers), prepare 18, train 197 (4,476 rows x 6 epochs), stitch 11, evaluate 108; total 527 s.
# On an H100 with 512 rows per decode (earlier defaults) the sampled answers did not fit: ~35 s per 512-row decode.
# If regeneration is cut by its budget share, run the same command again on the warm machine: regeneration resumes
# where it stopped (ids already in the output are skipped); train+evaluate then need ~5-6 min.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-run}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/smol_out}
WORK=${WORK:-/tmp/smol_gsm8k}
SMOL=${SMOL:-.smol}
SITE=${SITE:-/tmp/site}
export MTPTUNE_CACHE=${MTPTUNE_CACHE:-/tmp/mtptune_cache}  # the converted verifier: writable, survives between calls
mkdir -p "$OUT" "$SITE"
LOG="$OUT/device_run.log"
[ "$MODE" = preflight ] && LOG="$OUT/preflight.log"
exec > >(tee -a "$LOG") 2>&1
trap 'sleep 1' EXIT  # let tee write the last lines before the device collects $OUT
T0=$(date +%s)
say() { echo "[device_run $(($(date +%s) - T0)) s] $*"; }
die() { say "ERROR: $*"; exit 2; }

[ -f "$SMOL/a/manifest.env" ] || die "$SMOL/a/manifest.env missing: call 1 must carry .smol/a (make_device_carry.sh builds it); a fresh (cold) machine needs call 1 again"
# shellcheck disable=SC1091
source "$SMOL/a/manifest.env"

case ":${PYTHONPATH:-}:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ;; esac
case ":${PYTHONPATH:-}:" in *":$PWD/src:"*) ;; *) export PYTHONPATH="$PWD/src:$PYTHONPATH" ;; esac
# The gguf package (pure Python) from the carried wheel, once per machine.
if ! "$PY" -c "import gguf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$SMOL/a/whl/$GGUF_WHEEL" || die "installing $GGUF_WHEEL failed"
fi
# Every import a step needs (a missing one fails here in a second, not after minutes).
"$PY" - <<'EOF' || die "imports missing (did benchmarks/device_setup.sh run? it installs .bench/whl)"
import importlib, sys
mods = ["torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy", "yaml", "jinja2", "httpx", "fastapi",
        "uvicorn", "pydantic", "datasets", "tqdm", "matplotlib", "mtptune.cli.main"]
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{m} ({type(exc).__name__}: {exc})")
import torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if missing:
    print("missing:", *missing, sep="\n  ")
    sys.exit(1)
EOF
# Enough file descriptors for ~1,000 concurrent HTTP requests on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
CONCURRENCY=${CONCURRENCY:-2048}
if [ "$NOFILE" != unlimited ] && [ $((NOFILE / 2 - 64)) -lt "$CONCURRENCY" ]; then
  CONCURRENCY=$((NOFILE / 2 - 64)); say "open-file limit $NOFILE: regeneration concurrency lowered to $CONCURRENCY"
fi
SERVER_ROWS=${SERVER_ROWS:-1024}
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  die "DEVICE=cuda but torch sees no GPU"
fi

if [ "$MODE" = setup ]; then  # the cheap call 1: wheels + import checks + part-a, no dry run
  [ -f "$SMOL/a/part-a" ] && [ "$(stat -c %s "$SMOL/a/part-a")" = "$PART_A_SIZE" ] || die "$SMOL/a/part-a missing or truncated"
  say "setup ok: imports fine, $SMOL/a/part-a present ($PART_A_SIZE bytes); next: carry .smol/b and run device_run.sh"
  exit 0
fi
if [ "$MODE" = preflight ]; then
  [ -f "$SMOL/a/part-a" ] && [ "$(stat -c %s "$SMOL/a/part-a")" = "$PART_A_SIZE" ] || die "$SMOL/a/part-a missing or truncated"
  P_ARGS=(--config "$SMOL/a/preflight" --device "$DEVICE" --out "$OUT" --work "${PREFLIGHT_WORK:-/tmp/smol_preflight}"
          --concurrency "$CONCURRENCY" --server-max-rows "$SERVER_ROWS" --max-tokens "${MAX_TOKENS:-256}"
          --total-seq-len "${SEQ_LEN:-8192}" --loss "${LOSS:-kl}" --full-epochs "${EPOCHS:-6}"
          --full-answers-per-question "${ANSWERS:-4}")
  if [ "${TINY:-0}" = 1 ]; then
    P_ARGS+=(--rows 6 --sampled-rows 3 --max-tokens 8 --total-seq-len 512 --epochs 2 --eval-rows 2 --eval-prompts 2 --eval-max-tokens 8)
  fi
  say "preflight: ${P_ARGS[*]}"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout -k 20 "${HARD_TIMEOUT_S:-420}" \
    "$PY" examples/smollm2_gsm8k/device_preflight.py "${P_ARGS[@]}"
  RC=$?
  say "preflight exit $RC ($(($(date +%s) - T0)) s); $OUT/preflight.json"
  exit $RC
fi

# ---- run: reassemble the GGUF (a warm machine keeps it; checked either way) ----
GGUF_DIR=${GGUF_DIR:-/tmp/smol_gguf}
GGUF="$GGUF_DIR/$GGUF_NAME"
mkdir -p "$GGUF_DIR"
if [ ! -f "$GGUF" ] || [ "$(stat -c %s "$GGUF")" != "$GGUF_SIZE" ]; then
  [ -f "$SMOL/a/part-a" ] || die "$SMOL/a/part-a missing: call 1 must carry .smol/a on this same warm machine"
  [ -f "$SMOL/b/part-b" ] || die "$SMOL/b/part-b missing: this call must carry .smol/b"
  [ "$(stat -c %s "$SMOL/a/part-a")" = "$PART_A_SIZE" ] || die "$SMOL/a/part-a has the wrong size"
  [ "$(stat -c %s "$SMOL/b/part-b")" = "$PART_B_SIZE" ] || die "$SMOL/b/part-b has the wrong size"
  cat "$SMOL/a/part-a" "$SMOL/b/part-b" > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
fi
[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$GGUF_SHA256" ] || { rm -f "$GGUF"; die "$GGUF: sha256 mismatch"; }
say "GGUF ok: $GGUF ($GGUF_SIZE bytes, sha256 $GGUF_SHA256)"

ARGS=(--work-dir "$WORK" --device "$DEVICE" --gguf "$GGUF" --inputs "$SMOL/a/inputs" --publish "$OUT"
      --train-samples "${TRAIN_SAMPLES:-0}" --test-samples "${TEST_SAMPLES:-200}"
      --generate-samples "${GEN_SAMPLES:-50}" --mtbench-samples "${MTB_SAMPLES:-80}"
      --max-tokens "${MAX_TOKENS:-256}" --answers-per-question "${ANSWERS:-4}"
      --sample-temperature "${TEMP:-0.8}" --sample-top-p "${TOP_P:-0.95}"
      --concurrency "$CONCURRENCY" --server-max-rows "$SERVER_ROWS" --server-max-queue 4096
      --eval-max-tokens "${EVAL_MAX_TOKENS:-128}" --epochs "${EPOCHS:-6}" --lr "${LR:-1.5e-3}"
      --loss "${LOSS:-kl}" --init "${INIT:-random}" --total-seq-len "${SEQ_LEN:-8192}"
      --train-args "${TRAIN_ARGS:---warmup-steps 30}"
      --skip-untrained-eval --parallel-eval --time-budget "${BUDGET_S:-540}"
      --reserve-train-s "${RESERVE_TRAIN_S:-180}" --reserve-eval-s "${RESERVE_EVAL_S:-135}")
[ -n "${NAME:-}" ] && ARGS+=(--name "$NAME")
if [ "${TINY:-0}" = 1 ]; then  # CPU smoke run of this same script: tiny counts, small budget shares
  ARGS+=(--train-samples 8 --test-samples 4 --generate-samples 2 --mtbench-samples 2 --max-tokens 32
         --eval-max-tokens 16 --epochs 1 --total-seq-len 1024 --server-max-rows 16 --concurrency 32
         --reserve-train-s 60 --reserve-eval-s 60 --eval-startup-s 5)
fi
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})
say "run.py ${ARGS[*]}"
# A safety net under the device's 10-minute kill: SIGTERM makes run.py stop its steps and publish what it has.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout -k 20 "${HARD_TIMEOUT_S:-572}" "$PY" examples/smollm2_gsm8k/run.py "${ARGS[@]}"
RC=$?
say "run.py exit $RC ($(($(date +%s) - T0)) s); $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $RC
