#!/usr/bin/env bash
# The main job on this machine: a spoken question in, the text answer streamed and the
# spoken answer written to reply.wav, with first-text / first-audio latency in the JSON
# summary. Runs the shipped default model (llama_omni/weights/default-model: packaged
# Whisper base + packaged SmolLM2-135M-Instruct + our trained adaptor, LoRA and speech
# decoder + our hibari unit vocoder); see its MODEL_CARD.md for what it can and cannot do.
#
#   bash scripts/demo.sh [QUESTION.wav] [OUT.wav]
set -euo pipefail
cd "$(dirname "$0")/.."
question="${1:-llama_omni/serve/static/examples/capital.flac}"
out="${2:-reply.wav}"
.venv/bin/llama-omni chat "$question" --out "$out" --max-new-tokens 64 --json
