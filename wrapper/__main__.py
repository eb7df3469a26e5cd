"""The `wrapper` command's entry point (also `python -m wrapper ...`, as tests and benchmarks run it).

`wrapper serve` may spawn llama-server here, before click, PyYAML and pydantic are imported (wrapper.warm).
"""

import signal
import sys

from wrapper import warm


def main() -> None:
    # SIGTERM stops the wrapper from its first instant, until the supervisor installs its own handler: a
    # disposition inherited as "ignore" (from a parent that ignored it) would swallow a stop sent while the
    # profile is read, and keep an early llama-server serving that was asked to stop.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warm.begin(sys.argv[1:])
    from wrapper.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
