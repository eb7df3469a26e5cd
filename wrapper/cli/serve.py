"""`wrapper serve`: resolve profile -> ensure model -> derive flags -> supervise llama-server."""

from __future__ import annotations

import logging
import os
import signal

import click

from wrapper import supervisor
from wrapper.cli.common import load_settings, profile_options
from wrapper.errors import ServerFailed
from wrapper.launch import preflight
from wrapper.launch import prepare as serve
from wrapper.measure import selfcheck


@click.command("serve")
@profile_options
@click.option("--auto-tune", is_flag=True, help="Apply the best config recorded by `wrapper bench-profile`.")
@click.pass_context
def serve_cmd(ctx: click.Context, profile_name: str | None, config_path: str | None, auto_tune: bool) -> None:
    """Run llama-server for a profile and keep it up (the container's entrypoint).

    Stops cleanly on SIGTERM/SIGINT (exit 0); a second Ctrl-C kills llama-server at once (exit 130).
    Exits 4 when llama-server cannot start or keeps crashing, with the reason and its last log lines.
    """
    s = load_settings(profile_name, config_path)
    # Before the download and the launch: a port or GPU pin held by another instance fails fast (exit 2).
    with preflight.claim(s):
        prepared = serve.prepare(s, auto_tune=auto_tune, fetch=True)
        ctx.exit(_supervise_with_events(prepared))


def _supervise_with_events(prepared: serve.Prepared) -> int:
    """Supervise with NATS events (when NATS_URL is set) and the self-check after every "ready"."""
    s = prepared.settings
    publisher = None
    if s.env.nats_url:  # the NATS client and event models are imported only when events are wanted
        from wrapper.events.publisher import Publisher

        publisher = Publisher.from_settings(s, model=prepared.model or prepared.model_file)
    status = supervisor.StatusState.from_prepared(prepared, prepared.model)
    failed: list[selfcheck.SelfCheckResult] = []

    def stop_on_failed_check(result: selfcheck.SelfCheckResult) -> None:
        # selfcheck.on_fail: exit. Signal handlers only record, so this takes the same clean stop path as
        # `docker stop`; the exit code is decided below once the child is gone.
        log.error("selfcheck failed (%s) and selfcheck.on_fail is exit: stopping", result.reason)
        failed.append(result)
        os.kill(os.getpid(), signal.SIGTERM)

    # A tuned start is judged against the sweep that chose its config (same load, see serve._tuning).
    expected = None
    if prepared.tuned is not None:
        from wrapper.tuning import apply as tuning

        expected = tuning.selfcheck_expectation(s, prepared.tuned)
    listeners = [selfcheck.after_ready(s, publisher=publisher, status=status, on_fail_exit=stop_on_failed_check,
                                       model=prepared.model, model_file=prepared.model_file, expected=expected)]
    if publisher is not None:
        listeners.insert(0, publisher.instance_listener(s))
        publisher.start_heartbeat()
    try:
        code = supervisor.run(prepared, listeners=listeners, status=status)
    finally:
        if publisher is not None:
            publisher.close(s.profile.supervise.stop_grace_s)
    if failed:
        raise ServerFailed(
            f"selfcheck failed: {failed[0].reason} (selfcheck.on_fail is exit)",
            hint="see `wrapper selfcheck --url ...` for the figures, or set selfcheck.on_fail: warn to keep serving",
        )
    return code


log = logging.getLogger("wrapper.serve")

COMMANDS = [serve_cmd]
