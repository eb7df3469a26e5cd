"""The `wrapper` command: a thin click shell over the library.

Library code raises typed errors (wrapper.errors); `WrapperGroup.invoke` turns them into one line on
stderr (plus an indented hint) and the exit code from `errors.EXIT_CODES`. No traceback unless --debug.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import traceback
from types import TracebackType
from typing import cast

import click

from wrapper import __version__, logs
from wrapper.errors import Interrupted, WrapperError, exit_code_for

log = logging.getLogger("wrapper")


def say(line: str, redactor: logs.Redactor) -> None:
    """Print one line on stderr through the process's redactor: an error message may quote what a Hub or
    proxy echoed back, such as the header with the token in it (issue 15 item 4)."""
    click.echo(redactor.redact(line), err=True)


def fail(exc: BaseException, redactor: logs.Redactor) -> int:
    code = exit_code_for(exc)
    if isinstance(exc, Interrupted):
        # Not an error: the user (or docker stop) asked for it; the message says what stopped.
        say(exc.message, redactor)
        if exc.hint:
            say(f"  hint: {exc.hint}", redactor)
    elif isinstance(exc, WrapperError):
        say(f"error: {exc.message}", redactor)
        if exc.hint:
            say(f"  hint: {exc.hint}", redactor)
    elif isinstance(exc, KeyboardInterrupt):
        say("interrupted", redactor)
    return code


def _redacted_excepthook(redactor: logs.Redactor, kind: type[BaseException], exc: BaseException,
                         tb: TracebackType | None) -> None:
    # A bug's traceback is still printed (it is what a report needs), but never with a secret in it.
    sys.stderr.write(redactor.redact("".join(traceback.format_exception(kind, exc, tb))))


# Command name -> module under wrapper.cli. Modules are imported only when their command runs, so
# `wrapper serve` (a container's PID 1 child, restarted often) does not pay for bench, plan or fetch imports.
LAZY_COMMANDS = {
    "profiles": "profiles",
    "flags": "flags",
    "serve": "serve",
    "fetch": "fetch",
    "hw": "hw",
    "plan": "plan",
    "selfcheck": "selfcheck",
    "bench-profile": "bench",
    "results": "results",
    "fleet": "fleet",
}


class WrapperGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        module = importlib.import_module(f"wrapper.cli.{LAZY_COMMANDS[cmd_name]}")
        for candidate in module.COMMANDS:
            if candidate.name == cmd_name:
                return cast(click.Command, candidate)
        return None

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (WrapperError, KeyboardInterrupt) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            sys.exit(fail(exc, (ctx.obj or {}).get("redactor") or logs.Redactor()))


@click.group(cls=WrapperGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wrapper")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Profile-driven launcher, tuner and supervisor for llama.cpp's llama-server."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    # The process's one redactor: it learns the secrets when the settings are read (cli.common) and is handed
    # to everything that prints or serves text: the log handler, llama-server's output, /status, this root.
    redactor = ctx.obj["redactor"] = logs.Redactor()
    sys.excepthook = functools.partial(_redacted_excepthook, redactor)
