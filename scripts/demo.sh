#!/usr/bin/env bash
# The main job on the embedded default: slice SmolLM2-135M-Instruct by 25%, print dense vs
# sliced perplexity and parameter counts, save it to out/smollm2-25, and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/slicegpt slice default --sparsity 0.25 --out out/smollm2-25 --force "$@"
.venv/bin/slicegpt generate out/smollm2-25 "The king said to his daughter" --max-new-tokens 30
