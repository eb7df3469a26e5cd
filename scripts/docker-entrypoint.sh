#!/bin/sh
# The image's entrypoint (under tini). What `docker run IMAGE ...` / a compose `command:` runs:
#   (nothing) or options only  -> wrapper serve [options]      (the container's default job)
#   wrapper ARGS...            -> wrapper ARGS...
#   a wrapper subcommand ...   -> wrapper SUBCOMMAND ...       (docker run IMAGE hw, docker run IMAGE plan ...)
#   anything else              -> run as given                  (docker run -it IMAGE sh)
set -e
# Keep in step with wrapper/cli/__init__.py LAZY_COMMANDS (tests/test_container.py checks it).
COMMANDS="profiles flags serve fetch hw plan fleet selfcheck bench-profile results"
case "${1:-}" in
  "" | -*) exec wrapper serve "$@" ;;
  wrapper) shift; exec wrapper "$@" ;;
esac
for command in $COMMANDS; do
  if [ "$1" = "$command" ]; then exec wrapper "$@"; fi
done
exec "$@"
