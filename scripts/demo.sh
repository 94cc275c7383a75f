#!/usr/bin/env bash
# The main job on the embedded default: slice SmolLM2-135M-Instruct by 25%, print dense vs
# sliced perplexity and parameter counts, save it to out/smollm2-25, and generate from it.
# Then the same with one rotation for the whole stream: a standard LlamaForCausalLM with hidden
# size 432 (out/smollm2-25-uniform) and its GGUF file for llama.cpp (out/smollm2-25-uniform.gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/slicegpt slice default --sparsity 0.25 --out out/smollm2-25 --force "$@"
.venv/bin/slicegpt generate out/smollm2-25 "The king said to his daughter" --max-new-tokens 30
.venv/bin/slicegpt slice default --sparsity 0.25 --rotation uniform --out out/smollm2-25-uniform --force "$@"
.venv/bin/slicegpt export out/smollm2-25-uniform --format gguf --out out/smollm2-25-uniform.gguf --force
.venv/bin/slicegpt generate out/smollm2-25-uniform "The king said to his daughter" --max-new-tokens 30
