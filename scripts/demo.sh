#!/usr/bin/env bash
# The main job on the embedded default: compress SmolLM2-135M-Instruct by 25% of its decoder
# layers' weights (--sparsity 0.25), print dense vs compressed perplexity and parameter counts, save
# it to out/smollm2-25 (the default method: MLP neurons pruned with compensation, a stock
# LlamaForCausalLM), generate from it, then write its GGUF file for llama.cpp
# (out/smollm2-25.gguf). Extra arguments go to `slicegpt slice` (e.g. --method paper).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/slicegpt slice default --sparsity 0.25 --out out/smollm2-25 --force "$@"
.venv/bin/slicegpt generate out/smollm2-25 "The king said to his daughter" --max-new-tokens 30
if .venv/bin/python -c "import json,sys; sys.exit(0 if json.load(open('out/smollm2-25/slicegpt.json'))['slicing']['standard'] else 1)"; then
  .venv/bin/slicegpt export out/smollm2-25 --format gguf --out out/smollm2-25.gguf --force
fi
