"""`python -m wrapper ...` is the `wrapper` command (tests and benchmarks run it this way)."""

from wrapper.cli import main

main()
