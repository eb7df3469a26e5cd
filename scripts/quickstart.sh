#!/usr/bin/env bash
# The main job on a fresh machine: install, build (once) llama-server, write the tiny test models,
# and serve the `tiny-dense` profile (or $LLM_PROFILE_NAME). Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
.venv/bin/python -m wrapper.model.tiny_models models >&2
export LLM_PROFILE_NAME="${LLM_PROFILE_NAME:-tiny-dense}"
exec .venv/bin/wrapper serve "$@"
