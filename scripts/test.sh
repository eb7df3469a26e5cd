#!/usr/bin/env bash
# Installs everything the tests need (uv, locked deps, llama-server, nats-server) and runs
# ruff, mypy and the whole pytest suite against the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
echo "test: llama-server = $LLAMA_SERVER_BIN" >&2
.venv/bin/ruff check .
.venv/bin/mypy
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
