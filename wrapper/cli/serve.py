"""`wrapper serve`: resolve profile -> ensure model -> derive flags -> supervise llama-server."""

from __future__ import annotations

import logging

import click

from wrapper import settings, warm
from wrapper.cli.common import load_settings, profile_options, redactor


@click.command("serve")
@profile_options
@click.option("--auto-tune", is_flag=True, help="Apply the best config recorded by `wrapper bench-profile`.")
@click.pass_context
def serve_cmd(ctx: click.Context, profile_name: str | None, config_path: str | None, auto_tune: bool) -> None:
    """Run llama-server for a profile and keep it up (the container's entrypoint).

    Stops cleanly on SIGTERM/SIGINT (exit 0); a second Ctrl-C kills llama-server at once (exit 130).
    Exits 4 when llama-server cannot start or keeps crashing, with the reason and its last log lines.
    A start with the same inputs as the last one that became ready spawns llama-server before the profile is
    read and keeps it only if the command is the same (warm start; WRAPPER_WARM_START=0 turns it off).
    """
    # llama-server may already be loading (a warm start): it is adopted only if it is exactly what the steps
    # below derive, and stopped on every other way out of this command.
    early = warm.take()
    clean = False
    try:
        _serve(ctx, profile_name, config_path, auto_tune, early)
        clean = True
    except click.exceptions.Exit as done:
        clean = done.exit_code == 0
        raise
    finally:
        if not clean:
            warm.forget()  # a start that failed (or was forced) begins cold next time
        if early is not None and not early.settled:
            early.discard()
            logging.getLogger("wrapper.serve").info("warm start: stopped the early llama-server (this start "
                                                    "did not run it)")


def _serve(ctx: click.Context, profile_name: str | None, config_path: str | None, auto_tune: bool,
           early: warm.Early | None) -> None:
    from wrapper import serve
    from wrapper.launch import flags, preflight
    from wrapper.launch.prepare import prepare
    from wrapper.plan import hardware

    s = load_settings(profile_name, config_path)
    if warning := settings.status_port_warning(s.env):
        logging.getLogger("wrapper.serve").warning("%s", warning)
    host = hardware.for_settings(s)  # measured once: the claim names GPUs by UUID, the launch reuses it
    # Before the download and the launch: a port or GPU pin held by another instance, or a llama.cpp build
    # without kernels for the pinned GPU, fails fast (exit 2).
    preflight.check_build(s, host, flags.find_binary(s.env.llama_server_bin))
    held = (early.host, early.port) if early is not None and early.alive() else None
    with preflight.claim(s, host, held=held):
        # No --auto-tune: the profile's tuning.auto decides (None), as `wrapper flags` shows it.
        launch = prepare(s, auto_tune=auto_tune or None, fetch=True, host=host)
        # A tuned start that measures clearly below its recorded figure falls back to the last tuned config that
        # passed here (run_id), or to the profile's own config (None).
        fallback = None
        if launch.tuned is not None and s.profile.tuning.fallback:
            fallback = lambda run_id: prepare(s, auto_tune=False, tuned_run=run_id, fetch=True, host=host)  # noqa: E731
        ctx.exit(serve.run(launch, fallback=fallback, redactor=redactor(), early=early))


COMMANDS = [serve_cmd]
