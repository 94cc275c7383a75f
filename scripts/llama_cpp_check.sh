#!/usr/bin/env bash
# Run a GGUF file in real llama.cpp (prebuilt CPU binaries from npm's node-llama-cpp; no compiler,
# no GitHub). Needs node >= 20 and npm.   bash scripts/llama_cpp_check.sh FILE.gguf ["prompt"] [tokens]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="$(bash "$here/llama_cpp_setup.sh")"
cp "$here/llama_cpp_check.mjs" "$dir/check.mjs"
file="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
cd "$dir" && node check.mjs "$file" "${@:2}"
