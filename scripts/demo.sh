#!/usr/bin/env bash
# The main job on the embedded default: compress SmolLM2-135M-Instruct to 80% of its parameters
# (--size 0.8), print the plan, dense vs compressed perplexity and parameter counts, save it to
# out/smollm2-80 (the default recipe: at this size MLP neurons alone are pruned, with compensation,
# so the output is a stock LlamaForCausalLM), generate from it, then write its GGUF file for
# llama.cpp (out/smollm2-80.gguf). Extra arguments go to `slicegpt slice` (e.g. --recipe paper;
# an output in slicegpt's per-layer format is not exported).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/slicegpt slice default --size 0.8 --out out/smollm2-80 --force "$@"
.venv/bin/slicegpt generate out/smollm2-80 "The king said to his daughter" --max-new-tokens 30
if .venv/bin/python -c "import json,sys; sys.exit(0 if json.load(open('out/smollm2-80/slicegpt.json'))['slicing']['standard'] else 1)"; then
  .venv/bin/slicegpt export out/smollm2-80 --format gguf --out out/smollm2-80.gguf --force
fi
