#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: makes sure uv, the locked virtualenv and llama-server exist.
# After it: .venv/bin/wrapper works and LLAMA_SERVER_BIN points at a llama-server binary.
set -euo pipefail

if ! command -v uv >/dev/null 2>&1; then
  if [ -x "$HOME/.local/bin/uv" ]; then
    export PATH="$HOME/.local/bin:$PATH"
  else
    echo "bootstrap: installing uv (pip --user)" >&2
    python3 -m pip install --quiet --user uv 2>/dev/null \
      || python3 -m pip install --quiet --user --break-system-packages uv
    export PATH="$HOME/.local/bin:$PATH"
  fi
fi

# Bytecode compiled at install: where PYTHONDONTWRITEBYTECODE is set (common in containers and CI) nothing
# would ever cache it, and every start would compile the serve path again (~0.3 s measured).
uv sync --frozen --quiet --compile-bytecode --all-extras
.venv/bin/python -m compileall -q -j 0 wrapper >/dev/null

if [ -z "${LLAMA_SERVER_BIN:-}" ]; then
  if command -v llama-server >/dev/null 2>&1; then
    LLAMA_SERVER_BIN=$(command -v llama-server)
  else
    LLAMA_SERVER_BIN=$(scripts/build-llama-server.sh | tail -n1)
  fi
fi
export LLAMA_SERVER_BIN
