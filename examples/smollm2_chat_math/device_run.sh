#!/bin/bash
# Issue 21, goal 2 on a GPU device machine: examples/smollm2_gsm8k/device_run.sh with the chat + math mix's defaults
# (examples/smollm2_chat_math/run.py says what the mix is). Same carries, same calls, same work dir
# (/tmp/smol_gsm8k: the GSM8K answers regenerated for the GSM8K-only head are reused, only ShareGPT is added):
#
#   call 1, carry .bench .smol/a:  source benchmarks/device_setup.sh && bash examples/smollm2_chat_math/device_run.sh setup
#   call 2, carry .smol/b:         source benchmarks/device_setup.sh && STAGES=regen bash examples/smollm2_chat_math/device_run.sh
#   call 3:                        source benchmarks/device_setup.sh && STAGES=train bash examples/smollm2_chat_math/device_run.sh
#   call 4:                        source benchmarks/device_setup.sh && STAGES=eval bash examples/smollm2_chat_math/device_run.sh
#
# (calls 1-2 are not needed again on a machine that already ran the GSM8K example: start at STAGES=regen.)
# Estimates for one H200, not measured yet: regen ~3-5 min (2,000 conversations x 2 turns x <= 256 tokens greedy,
# + the GSM8K answers if this machine has none: ~2.5 min), train ~6-7 min (~3.1 M tokens x 4 epochs: the GSM8K-only
# head trained 1.26 M x 6 in 197 s), eval ~5 min (+ the fresh head once per machine). Every stage resumes where its
# time budget stopped it: run the same command again.
# Levers (environment, as in smollm2_gsm8k/device_run.sh): CHAT_SAMPLES CHAT_TURNS ANSWERS MAX_ROWS EPOCHS LOSS LR
# TRAIN_K ... ; every run adds a row to $OUT/results_rows.jsonl.
export CHAT_SAMPLES=${CHAT_SAMPLES:-2000} CHAT_TURNS=${CHAT_TURNS:-2} EPOCHS=${EPOCHS:-4}
exec bash "$(dirname "$0")/../smollm2_gsm8k/device_run.sh" "$@"
