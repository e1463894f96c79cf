#!/usr/bin/env bash
# Rebuild the default model's stage-2 data from nothing (runs/ is not kept between
# machines): the sharegpt-1k data set, the hibari voice corpus extended to N_TRAIN
# sentences, their units, and the mix of both (scripts/stage2_mix.py). Every step skips
# finished work, so after a kill run it again. About 50 min on 2 cores.
#
#   nohup bash scripts/build_stage2_data.sh > runs/stage2-data.log 2>&1 &
#
# Environment: N_TRAIN (corpus training sentences, default 6000), THREADS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
N_TRAIN="${N_TRAIN:-6000}"
THREADS="${THREADS:-1}"
BIN=.venv/bin
CORPUS="runs/voice/corpus-$N_TRAIN"
UNITS="runs/voice/corpus-${N_TRAIN}_train_units.jsonl"
export OMP_NUM_THREADS="$THREADS"

echo "== 1/4 data set (runs/data/sharegpt-1k)"
"$BIN/llama-omni" data build configs/data/sharegpt-1k.yaml --workers 1

echo "== 2/4 voice corpus ($CORPUS)"
"$BIN/llama-omni" vocoder corpus "$CORPUS" --n-train "$N_TRAIN" --workers 1

if [ ! -f "$UNITS" ]; then
  echo "== 3/4 units of the corpus's training sentences"
  "$BIN/llama-omni" units extract "$CORPUS" --split train --out "$UNITS" --threads "$THREADS"
fi

echo "== 4/4 mix: data-set items + corpus sentences as extra answers"
"$BIN/python" scripts/stage2_mix.py --data runs/data/sharegpt-1k --corpus "$CORPUS" \
  --units "$UNITS" --out "runs/data/stage2-mix-$N_TRAIN"
