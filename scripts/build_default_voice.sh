#!/usr/bin/env bash
# Build the default voice end to end: hibari speech of ShareGPT sentences -> Whisper-base
# layer features -> k-means units -> unit vocoder training. Every stage skips work already
# done, and vocoder training resumes from its last checkpoint: after a kill, run it again.
#
#   nohup nice -n 10 bash scripts/build_default_voice.sh > runs/voice/build.log 2>&1 &
#
# Environment: RUN (work dir, default runs/voice), PRESET (vocoder size, default istft-256), LAYER, K, STEPS, GAN_START,
# DISC_WIDTH, DISC_PERIODS (e.g. 2,3,5,7,11,16), CKPT_EVERY, THREADS, INIT_GENERATOR (a new run starts from this saved
# vocoder, e.g. the shipped one when its run directory is gone), INIT_MATCHING=1 (warm start of another preset from
# INIT_GENERATOR: only tensors whose names and shapes match are copied), and
# UNITS_DIR / VOCODER_DIR (where the shippable units model and vocoder are written).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${RUN:-runs/voice}"
LAYER="${LAYER:-4}"
K="${K:-500}"
PRESET="${PRESET:-istft-256}"
STEPS="${STEPS:-20000}"
THREADS="${THREADS:-1}"
GAN_START="${GAN_START:-3000}"
DISC_WIDTH="${DISC_WIDTH:-0.125}"
DISC_PERIODS="${DISC_PERIODS:-2,3,5,7,11}"
CKPT_EVERY="${CKPT_EVERY:-300}"
INIT_GENERATOR="${INIT_GENERATOR:-}"
INIT_MATCHING="${INIT_MATCHING:-}"
UNITS_DIR="${UNITS_DIR:-llama_omni/weights/units-whisper-base}"
VOCODER_DIR="${VOCODER_DIR:-llama_omni/weights/vocoder-hibari}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$RUN"

echo "== 1/4 corpus: hibari speech of ShareGPT sentences ($RUN/corpus)"
"$PY" -m llama_omni.cli.vocoder corpus "$RUN/corpus"

if [ ! -f "$UNITS_DIR/units.json" ]; then
  echo "== 2/4 units model: k-means K=$K on Whisper base layer $LAYER"
  "$PY" -m llama_omni.cli.units train "$RUN/corpus" --out "$UNITS_DIR" --layer "$LAYER" --k "$K" \
    --threads "$THREADS"
fi

if [ ! -f "$RUN/units.npz" ]; then
  echo "== 3/4 frame-level units of the corpus"
  "$PY" -m llama_omni.cli.units extract "$RUN/corpus" --units-model "$UNITS_DIR" \
    --out "$RUN/units.npz" --threads "$THREADS"
fi

echo "== 4/4 vocoder training (resumes from $RUN/vocoder/last.pt)"
"$PY" -m llama_omni.cli.vocoder train --corpus "$RUN/corpus" --units "$RUN/units.npz" \
  --run-dir "$RUN/vocoder" --num-units "$K" --preset "$PRESET" --export-dir "$VOCODER_DIR" --steps "$STEPS" \
  --gan-start-step "$GAN_START" --disc-width "$DISC_WIDTH" --disc-periods "$DISC_PERIODS" --checkpoint-every "$CKPT_EVERY" \
  --threads "$THREADS" ${INIT_GENERATOR:+--init-generator "$INIT_GENERATOR"} ${INIT_MATCHING:+--init-matching}
