#!/usr/bin/env bash
# Install real llama.cpp for GGUF checks: npm's node-llama-cpp with its prebuilt CPU binaries (no
# compiler, no GitHub), into the slicegpt cache. Prints the folder. Needs node >= 20 and npm.
set -euo pipefail
dir="${SLICEGPT_CACHE:-$HOME/.cache/slicegpt}/node-llama-cpp"
if [ ! -d "$dir/node_modules/node-llama-cpp" ]; then
  mkdir -p "$dir"
  (cd "$dir" && npm init -y >/dev/null && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --silent node-llama-cpp@3.22.1 >&2)
fi
echo "$dir"
