#!/usr/bin/env bash
# Rebuild the default model's stage 1 from nothing (runs/ is not kept between machines):
# the data (with the answers' units, for scripts/build_default_stage2.sh), the "repeat /
# answer" task mix, adaptor pre-alignment, then stage 1 on the mix with the adaptor alone
# (the LLM and its shipped LoRA frozen), and the candidate model assembled with the
# shipped speech decoder. The long steps resume from their checkpoints and the short ones
# are redone: after a kill, run it again. About 3 h on 2 cores (data ~1.5 h: every
# instruction of the config, about 3,600 answered, in waves of 500 questions, about 10 min
# and 380 answers each; align 30 min; stage 1 50 min). The data may be stopped after any
# wave (kill the two shards, then run the later steps by hand): our runs used 1,933 and
# 1,167 items.
#
#   nohup bash scripts/build_default_stage1.sh > runs/stage1-build.log 2>&1 &
#
# Then evaluate runs/candidate/default-model (README, "Evaluation") before installing it
# with scripts/build_default_model.py --out llama_omni/weights/default-model.
# Environment: SKIP_DATA=1 (the data build finished or was stopped: start at the mix),
# STEPS (stage-1 steps, default 300), ALIGN_STEPS (default 200), THREADS
# (default 2), PRECISION (default bf16 where the CPU has bf16 instructions, else fp32:
# emulated bf16 is 10-20x slower), ALIGN / STAGE1 / CANDIDATE (the run directories: a
# new name starts a new run; the same name resumes). It starts from the shipped model's
# adaptor: to repeat the run that made candidate 1 (shipped since ed26254) exactly, first
# `git checkout dbac423 -- llama_omni/weights/default-model`; candidate 3 started from
# the adaptor shipped at ed26254, candidate 5 from the one shipped at 5dc7ef3.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-300}"
ALIGN_STEPS="${ALIGN_STEPS:-200}"
PRECISION="${PRECISION:-$(.venv/bin/python -c 'from llama_omni.train.config import cpu_bf16_support as s; print("bf16" if s() else "fp32")')}"
THREADS="${THREADS:-2}"
BIN=.venv/bin
DATA=runs/data/sharegpt-default
MIX_TRAIN=runs/data/mixed-train.json
MIX_HELDOUT=runs/data/mixed-heldout.json
ALIGN="${ALIGN:-runs/small-cpu/align}"
STAGE1="${STAGE1:-runs/small-cpu/stage1-mixed-ad}"
CANDIDATE="${CANDIDATE:-runs/candidate/default-model}"
export OMP_NUM_THREADS=1

if [ "${SKIP_DATA:-0}" = 1 ]; then
  echo "== 1/5 data: skipped (SKIP_DATA=1), using $DATA as it is"
  [ -f "$DATA/manifest.jsonl" ] || { echo "no $DATA/manifest.jsonl: build the data first" >&2; exit 1; }
else
  echo "== 1/5 data (rewrite, respond, synthesize, units; two shards side by side)"
  pids=()
  for shard in 0 1; do
    "$BIN/llama-omni" data build configs/data/sharegpt-default.yaml \
      --shard "$shard/2" &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do wait "$pid"; done   # a failed shard stops the script
fi

echo "== 2/5 task mix (each item as 'repeat the question' and as 'answer it')"
"$BIN/python" scripts/repeat_task.py --data "$DATA" --mix-answers \
  --out "$MIX_TRAIN" --heldout-out "$MIX_HELDOUT"

export OMP_NUM_THREADS="$THREADS"
echo "== 3/5 adaptor pre-alignment from the shipped model"
"$BIN/llama-omni" train align configs/train/small-cpu-align.yaml --data "$DATA" \
  --checkpoint llama_omni/weights/default-model --output-dir "$ALIGN" --max-steps "$ALIGN_STEPS"

echo "== 4/5 stage 1, adaptor only, on the mix"
"$BIN/llama-omni" train stage1 configs/train/small-cpu-stage1.yaml \
  --data "$MIX_TRAIN" --set data.eval="$MIX_HELDOUT" \
  --checkpoint "$ALIGN/final" --tuning adaptor --lr 1e-3 --precision "$PRECISION" \
  --output-dir "$STAGE1" --max-steps "$STEPS" \
  --set eval_every=40 --set save_every=10

echo "== 5/5 candidate: this adaptor + the shipped LoRA and speech decoder"
"$BIN/python" scripts/build_default_model.py --stage1-model "$STAGE1/final" \
  --stage2 llama_omni/weights/default-model --out "$CANDIDATE"
# the candidate's config names its vocoder as ../vocoder-hibari, as the shipped model does
ln -sfn "$PWD/llama_omni/weights/vocoder-hibari" "$(dirname "$CANDIDATE")/vocoder-hibari"
"$BIN/llama-omni" train heldout configs/train/small-cpu-stage1.yaml "$CANDIDATE" \
  --set data.train="$MIX_TRAIN" --set data.eval="$MIX_HELDOUT" \
  --no-answers --items 30 --out "$(dirname "$CANDIDATE")/heldout.json"
