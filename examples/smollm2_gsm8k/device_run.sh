#!/bin/bash
# The SmolLM2-135M-Instruct + GSM8K example (run.py) at full size on a GPU device machine, in calls to the same warm
# machine (the 98 MB GGUF is over one call's 64 MiB; examples/smollm2_gsm8k/make_device_carry.sh splits it).
#
#   call 1, carry .bench .smol/a:  source benchmarks/device_setup.sh && bash examples/smollm2_gsm8k/device_run.sh setup
#   call 2, carry .smol/b:         source benchmarks/device_setup.sh && STAGES=regen,train bash examples/smollm2_gsm8k/device_run.sh
#   call 3, no carry:              source benchmarks/device_setup.sh && STAGES=eval bash examples/smollm2_gsm8k/device_run.sh
#
# Carried folders do not survive to the next call (a call replaces the ignored paths it does not carry), so every
# call first copies whatever it brought of .smol/{a,b,cache} to $KEEP (/tmp/smol_carry, which survives on a warm
# machine) and reads them from there: .smol/a from call 1 is still there at call 2 and 3.
#
# setup (~30 s): installs the gguf wheel, checks the imports and part-a; nothing else.
# preflight (~3-4 min incl. the wheel installs, instead of setup): device_preflight.py runs the whole pipeline on a
#   random-weight SmolLM2 (every CUDA path once, compile caches warm) and writes $OUT/preflight.json with the
#   measured times and a projection for the full run.
# run (default): reassembles the GGUF from part-a + part-b once (size + sha256 checked against manifest.env; kept in
#   /tmp/smol_gguf), then run.py --device cuda --stages $STAGES with --time-budget BUDGET_S. Resumable: every stage
#   skips what is finished (regenerated answers are resumed by id and marked complete, a trained experiment has
#   train_done.json, evaluations are keyed by their settings), so the same command again continues where the last
#   one stopped. The work dir /tmp/smol_gsm8k survives on a warm machine: a call with other levers (LOSS, EPOCHS, LR,
#   TRAIN_K, ANSWERS, CHAT_SAMPLES, ...) reuses the verifier, the regenerated answers and the hidden-state cache.
#   $OUT gets results.json, results.png, results_rows.jsonl (one row per experiment; results_table.py),
#   head_<experiment>.tar.gz (each head this call trained: checkpoint_best's config.json + model.safetensors),
#   logs.tar.gz and device_run.log after every step, and regenerated_{math,chat}.tar.gz (the answers, for the next
#   session: put them in .smol/cache/ and carry .smol/cache once; they are unpacked into an empty work dir).
#
# Knobs (environment; defaults = issue 21's GSM8K-only head): STAGES=regen,train,eval ANSWERS=4 (greedy + 3 sampled
#   per training question) TEMP=0.8 TOP_P=0.95 MAX_TOKENS=256 EPOCHS=6 LR=1.5e-3 LOSS=kl INIT=random TRAIN_K=3 (K in
#   training; evaluation is always at K=3) SEQ_LEN=8192 TRAIN_ARGS="--warmup-steps 30" TRAIN_SAMPLES=0 (all 1,119)
#   MAX_ROWS= (train on the first N rows only) CHAT_SAMPLES=0 CHAT_TURNS=2 (ShareGPT conversations in the mix, turns
#   each) TEST_SAMPLES=200 GEN_SAMPLES=200 (held-out GSM8K prompts decoded) MTB_SAMPLES=80 MTB_TURNS=2
#   EVAL_TEMPS="0 0.7" EVAL_SEED=0 EVAL_WORKERS=1 (processes per decoding job; 1: the jobs run side by side, one
#   process each) EVAL_BATCH=50 (prompts decoded together in each; the budget is checked between batches; 1 = one
#   at a time: the 2026-12-03 figures ran EVAL_WORKERS=12 EVAL_BATCH=1) EVAL_STARTUP_S=30 (their spawn +
#   load, kept out of each job's --max-seconds) EVAL_MAX_TOKENS=128 SKIP_FRESH=0
#   BUDGET_S=540 RESERVE_TRAIN_S=180 RESERVE_EVAL_S=135 SERVER_ROWS=1024 CONCURRENCY=4096 (requests in flight in
#   all, shared by the regenerations that run together: 2048 each for GSM8K's two greedy ones) NAME= EXTRA_ARGS=
#   WORK=/tmp/smol_gsm8k KEEP=/tmp/smol_carry DEVICE=cuda HARD_TIMEOUT_S=572 (run.py gets SIGTERM then: it stops its
#   steps and publishes; preflight: 420); TINY=1 shrinks everything to a CPU-sized smoke run (with DEVICE=cpu,
#   PYTHON=..., OUT=...).
#
# Measured on one H200 (2026-11-28, session 4, docs/results.md; ANSWERS=4 EPOCHS=6, evaluation then on 14 + 10
# prompts): server 38, greedy regeneration 64 (1,319 answers, 1,024 rows per decode), sampled 90 (3,357 answers),
# prepare 18, train 197 (4,476 rows x 6 epochs), stitch 11 s. Measured 2026-12-03 (chat + math mix, docs/results.md):
# with one prompt at a time in each of 12 workers a decoding job of ~100 prompts took ~96 s; batched decoding
# (EVAL_BATCH) is not measured on a GPU yet. If the budget cuts a job, the result says how many prompts ran and
# the same command again redoes only that job.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-run}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/smol_out}
WORK=${WORK:-/tmp/smol_gsm8k}
KEEP=${KEEP:-/tmp/smol_carry}
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

# What this call carried of .smol/{a,b,cache} goes to $KEEP first: a later call on this machine that carries other
# paths finds it there (the carried copy in the working tree is gone by then).
mkdir -p "$KEEP"
for part in a b cache; do
  if [ -d ".smol/$part" ] && [ -n "$(ls -A ".smol/$part")" ]; then
    rm -rf "$KEEP/$part.tmp" && cp -a ".smol/$part" "$KEEP/$part.tmp" && rm -rf "$KEEP/$part" && mv "$KEEP/$part.tmp" "$KEEP/$part" \
      || die "copying .smol/$part to $KEEP failed (disk full?)"
    say "kept .smol/$part in $KEEP/$part ($(du -sh "$KEEP/$part" | cut -f1))"
  fi
done
SMOL=$KEEP
[ -f "$SMOL/a/manifest.env" ] || die "$SMOL/a/manifest.env missing: call 1 must carry .smol/a (make_device_carry.sh builds it) on this same warm machine; a fresh (cold) machine needs call 1 again"
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
CONCURRENCY=${CONCURRENCY:-4096}
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
          --concurrency "$((CONCURRENCY / 2))" --server-max-rows "$SERVER_ROWS" --max-tokens "${MAX_TOKENS:-256}"
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
  [ -f "$SMOL/b/part-b" ] || die "$SMOL/b/part-b missing: this call (or an earlier one on this machine) must carry .smol/b"
  [ "$(stat -c %s "$SMOL/a/part-a")" = "$PART_A_SIZE" ] || die "$SMOL/a/part-a has the wrong size"
  [ "$(stat -c %s "$SMOL/b/part-b")" = "$PART_B_SIZE" ] || die "$SMOL/b/part-b has the wrong size"
  cat "$SMOL/a/part-a" "$SMOL/b/part-b" > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
fi
[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$GGUF_SHA256" ] || { rm -f "$GGUF"; die "$GGUF: sha256 mismatch"; }
say "GGUF ok: $GGUF ($GGUF_SIZE bytes, sha256 $GGUF_SHA256)"

# Regenerated answers a previous session brought back ($OUT/regenerated_*.tar.gz, carried as .smol/cache): unpacked
# into the work dir without replacing any file already there (regeneration then resumes from what is missing).
mkdir -p "$WORK"
for tarball in "$SMOL"/cache/regenerated_*.tar.gz; do
  [ -f "$tarball" ] && tar xzf "$tarball" -C "$WORK" --skip-old-files && say "unpacked $tarball into $WORK (existing files kept)"
done

STAGES=${STAGES:-regen,train,eval}
# shellcheck disable=SC2206
TEMPS=(${EVAL_TEMPS:-0 0.7})
ARGS=(--work-dir "$WORK" --device "$DEVICE" --gguf "$GGUF" --inputs "$SMOL/a/inputs" --publish "$OUT" --stages "$STAGES"
      --train-samples "${TRAIN_SAMPLES:-0}" --test-samples "${TEST_SAMPLES:-200}"
      --generate-samples "${GEN_SAMPLES:-200}" --mtbench-samples "${MTB_SAMPLES:-80}" --mtbench-turns "${MTB_TURNS:-2}"
      --eval-temperatures "${TEMPS[@]}" --eval-seed "${EVAL_SEED:-0}" --eval-workers "${EVAL_WORKERS:-1}"
      --eval-batch-size "${EVAL_BATCH:-50}"
      --eval-startup-s "${EVAL_STARTUP_S:-30}"
      --max-tokens "${MAX_TOKENS:-256}" --answers-per-question "${ANSWERS:-4}"
      --sample-temperature "${TEMP:-0.8}" --sample-top-p "${TOP_P:-0.95}"
      --chat-samples "${CHAT_SAMPLES:-0}" --chat-max-turns "${CHAT_TURNS:-2}"
      --concurrency "$CONCURRENCY" --server-max-rows "$SERVER_ROWS" --server-max-queue "$((CONCURRENCY > 4096 ? CONCURRENCY : 4096))"
      --eval-max-tokens "${EVAL_MAX_TOKENS:-128}" --epochs "${EPOCHS:-6}" --lr "${LR:-1.5e-3}"
      --loss "${LOSS:-kl}" --init "${INIT:-random}" --total-seq-len "${SEQ_LEN:-8192}"
      --num-steps 3 --train-num-steps "${TRAIN_K:-3}"
      --train-args "${TRAIN_ARGS:---warmup-steps 30}"
      --parallel-eval --time-budget "${BUDGET_S:-540}"
      --reserve-train-s "${RESERVE_TRAIN_S:-180}" --reserve-eval-s "${RESERVE_EVAL_S:-135}")
[ -n "${NAME:-}" ] && ARGS+=(--name "$NAME")
[ -n "${MAX_ROWS:-}" ] && ARGS+=(--max-rows "$MAX_ROWS")
[ "${SKIP_FRESH:-0}" = 1 ] && ARGS+=(--skip-untrained-eval)
if [ "${TINY:-0}" = 1 ]; then  # CPU smoke run of this same script: tiny counts, small budget shares
  ARGS+=(--train-samples 8 --test-samples 4 --generate-samples 2 --mtbench-samples 2 --max-tokens 32
         --eval-max-tokens 16 --epochs 1 --total-seq-len 1024 --server-max-rows 16 --concurrency 32
         --eval-workers 2 --reserve-train-s 60 --reserve-eval-s 60 --eval-startup-s 5)
  [ "${CHAT_SAMPLES:-0}" != 0 ] && ARGS+=(--chat-samples 4)
fi
# shellcheck disable=SC2206
ARGS+=(${EXTRA_ARGS:-})
say "run.py ${ARGS[*]}"
CALL_START=$(mktemp) # heads trained after this are returned below
# A safety net under the device's 10-minute kill: SIGTERM makes run.py stop its steps and publish what it has.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout -k 20 "${HARD_TIMEOUT_S:-572}" "$PY" examples/smollm2_gsm8k/run.py "${ARGS[@]}"
RC=$?
# The regenerated answers (+ their reports and completion markers), for a later session's fresh machine (see the
# header): one tarball per domain, each well under the 16 MiB a returned file may have.
if [ -d "$WORK" ]; then
  mapfile -t MATH < <(cd "$WORK" && ls -d regenerated_*.jsonl* 2>/dev/null | grep -v '^regenerated_chat_')
  mapfile -t CHAT < <(cd "$WORK" && ls -d regenerated_chat_*.jsonl* 2>/dev/null)
  [ ${#MATH[@]} -gt 0 ] && tar czf "$OUT/regenerated_math.tar.gz" -C "$WORK" "${MATH[@]}"
  [ ${#CHAT[@]} -gt 0 ] && tar czf "$OUT/regenerated_chat.tar.gz" -C "$WORK" "${CHAT[@]}"
  say "regenerated answers: $(cd "$OUT" && du -h regenerated_*.tar.gz 2>/dev/null | tr '\t\n' '  ')"
fi
# The heads this call trained (bf16 head + config, ~8 MB each; the optimizer state stays): for analysis here
# (e.g. `evaluate generate --dtype float32` on the CPU) and as the starting point of a later run.
for best in "$WORK"/exp/*/checkpoints/checkpoint_best; do  # a symlink to the best epoch's folder
  [ -f "$best/model.safetensors" ] && [ "$best/model.safetensors" -nt "$CALL_START" ] || continue
  exp=$(basename "$(dirname "$(dirname "$best")")")
  tar czf "$OUT/head_$exp.tar.gz" -C "$best" config.json model.safetensors && say "returned head_$exp.tar.gz"
done
say "run.py exit $RC ($(($(date +%s) - T0)) s); $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $RC
