#!/usr/bin/env bash
# The main job on a fresh machine: install, build (once) llama-server, then serve a small real instruct
# model, profile `smollm2-360m` (270 MB from Hugging Face, pinned by commit and sha256, downloaded once
# into LLM_CACHE_DIR), or $LLM_PROFILE_NAME. Where the model cannot be had (no route to the Hub,
# HF_HUB_OFFLINE, ...) it says so in one line and serves `tiny-dense` (random weights) instead, so the
# command always ends in a serving server. Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
.venv/bin/python -m wrapper.model.tiny_models models >&2
# Downloads go to the user's cache beside the llama-server build, not into the checkout.
export LLM_CACHE_DIR="${LLM_CACHE_DIR:-$HOME/.cache/wrapper/models}"

if [ -z "${LLM_PROFILE_NAME:-}" ] && [[ " $* " != *" --profile"* ]]; then
  LLM_PROFILE_NAME=smollm2-360m
  # `fetch` is the download `serve` would do (progress, sha256 against the pin), done first so a model that
  # cannot be had is known before anything starts. Its error lines and retry warnings are held back: the
  # user gets one line.
  errors=$(mktemp)
  trap 'rm -f "$errors"' EXIT
  set +e
  .venv/bin/wrapper fetch --profile "$LLM_PROFILE_NAME" 2>&1 | tee "$errors" \
    | grep --line-buffered -v -e '^error: ' -e '^  hint: ' -e 'Hub metadata request' >&2
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 3 ]; then  # 3: model unavailable or failed verification (wrapper/errors.py)
    reason=$(sed -n 's/^error: //p' "$errors" | head -n1)
    echo "quickstart: cannot fetch the $LLM_PROFILE_NAME model ($reason); serving tiny-dense (random weights, answers are noise) instead" >&2
    LLM_PROFILE_NAME=tiny-dense
  elif [ "$rc" -ne 0 ]; then
    grep -e '^error: ' -e '^  hint: ' "$errors" >&2
    exit "$rc"
  fi
fi
export LLM_PROFILE_NAME="${LLM_PROFILE_NAME:-tiny-dense}"
exec .venv/bin/wrapper serve "$@"
