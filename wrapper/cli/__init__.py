"""The `wrapper` command: a thin click shell over the library.

Library code raises typed errors (wrapper.errors); `WrapperGroup.invoke` turns them into one line on
stderr (plus an indented hint) and the exit code from `errors.EXIT_CODES`. No traceback unless --debug.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from wrapper import __version__
from wrapper.errors import WrapperError, exit_code_for

log = logging.getLogger("wrapper")


def fail(exc: BaseException) -> int:
    code = exit_code_for(exc)
    if isinstance(exc, WrapperError):
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
    elif isinstance(exc, KeyboardInterrupt):
        click.echo("interrupted", err=True)
    return code


class WrapperGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (WrapperError, KeyboardInterrupt) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            sys.exit(fail(exc))


@click.group(cls=WrapperGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wrapper")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Profile-driven launcher, tuner and supervisor for llama.cpp's llama-server."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from wrapper.cli import bench, fetch, flags, hw, plan, profiles, results, selfcheck, serve

    for module in (profiles, flags, serve, fetch, hw, plan, selfcheck, bench, results):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
