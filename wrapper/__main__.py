"""The `wrapper` command's entry point (also `python -m wrapper ...`, as tests and benchmarks run it).

`wrapper serve` may spawn llama-server here, before click, PyYAML and pydantic are imported (wrapper.warm).
"""

import sys

from wrapper import warm


def main() -> None:
    warm.begin(sys.argv[1:])
    from wrapper.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
