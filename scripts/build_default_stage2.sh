#!/usr/bin/env bash
# Stage 2 for the candidate of scripts/build_default_stage1.sh: its new adaptor changes the
# LLM states of every answer token, and its answers follow the backbone's own (plain-text)
# answers, which the shipped speech decoder never saw. This leg trains the shipped decoder
# further on the candidate's teacher-forced states of the stage-1 data's answers (their
# hibari units), measures held-out units ASR-WER before and after, and assembles OUT
# (the candidate's adaptor and LoRA + the new decoder). Candidate 4 came from
# CANDIDATE=runs/candidate3/default-model; candidate 6 from CANDIDATE=runs/candidate5/default-model
# STEPS=200; candidate 8, the default model since the 22nd session (with blank_penalty 1
# set afterwards), from CANDIDATE=runs/candidate7/default-model STEPS=200.
# The training resumes from its checkpoints: after a kill, run it again.
#
#   nohup bash scripts/build_default_stage2.sh > runs/stage2-build.log 2>&1 &
#
# Environment: STEPS (default 300 steps of 8), THREADS (default 2), PRECISION (as in
# build_default_stage1.sh), CANDIDATE (the stage-1 candidate), RUN (the training run's
# directory: the same name resumes), OUT (candidate 2), TRAIN_ARGS (more options for the
# training, e.g. "--set model.overrides.speech_decoder.lookahead=true").
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-300}"
PRECISION="${PRECISION:-$(.venv/bin/python -c 'from llama_omni.train.config import cpu_bf16_support as s; print("bf16" if s() else "fp32")')}"
export OMP_NUM_THREADS="${THREADS:-2}"
BIN=.venv/bin
DATA=runs/data/sharegpt-default
CANDIDATE="${CANDIDATE:-runs/candidate/default-model}"
RUN="${RUN:-runs/small-cpu/stage2-candidate}"
OUT="${OUT:-runs/candidate2/default-model}"
VOCODER=llama_omni/weights/vocoder-hibari

heldout() {  # CHECKPOINT OUT_JSON: teacher-forced units of 30 held-out answers -> Whisper WER
  "$BIN/llama-omni" train heldout configs/train/small-cpu-stage2.yaml "$1" \
    --set data.train="$DATA" --vocoder "$VOCODER" --no-answers --items 30 --out "$2"
}

echo "== 1/3 held-out units WER of the candidate as it is"
[ -f "$RUN/heldout-before.json" ] || { mkdir -p "$RUN"; heldout "$CANDIDATE" "$RUN/heldout-before.json"; }

echo "== 2/3 stage 2 from the candidate's decoder on its own answer states"
"$BIN/llama-omni" train stage2 configs/train/small-cpu-stage2.yaml --checkpoint "$CANDIDATE" \
  --data "$DATA" --output-dir "$RUN" --batch-size 8 --micro-batch-size 4 \
  --precision "$PRECISION" --lr 3e-4 --max-steps "$STEPS" \
  --set save_every=25 --set eval_every=50 ${TRAIN_ARGS:-}

echo "== 3/3 candidate 2: the candidate's stage 1 + this decoder"
"$BIN/python" scripts/build_default_model.py --stage1-model "$CANDIDATE" \
  --stage2 "$RUN/final" --out "$OUT"
ln -sfn "$PWD/$VOCODER" "$(dirname "$OUT")/vocoder-hibari"
heldout "$OUT" "$RUN/heldout-after.json"
