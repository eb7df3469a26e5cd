"""`wrapper selfcheck`: the short throughput check against a running llama-server.

Exit status: 0 for pass or degraded, 1 for fail, 4 when the server does not answer.
"""

from __future__ import annotations

import dataclasses

import click

from wrapper import logs, serve
from wrapper.cli.common import echo_json, environment, load_settings, profile_options, redactor
from wrapper.errors import SelfCheckFailed
from wrapper.events.payloads import SelfCheck
from wrapper.measure import selfcheck
from wrapper.profiles.schema import SelfCheckSpec


@click.command("selfcheck")
@profile_options
@click.option("--url", metavar="URL", help="llama-server base URL (default: the profile's host and port).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Requests in flight (default: parallel slots).")
@click.option("--requests", "requests_", type=click.IntRange(min=1),
              help="Measured requests (default: 2 x concurrency).")
@click.option("--expected", type=click.FloatRange(min=0, min_open=True), metavar="TOK_S",
              help="Compare with this throughput instead of the last passing self-check.")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON.")
def selfcheck_cmd(*, profile_name: str | None, config_path: str | None, url: str | None, concurrency: int | None,
                  requests_: int | None, expected: float | None, as_json: bool) -> None:
    """Measure a running server's throughput and judge it: pass, degraded or fail."""
    env = environment()
    if profile_name or env.profile_name or not url:
        s = load_settings(profile_name, config_path)
        from wrapper.launch.prepare import prepare

        # The profile's launch, as `serve` would run it: its URL, keys, fingerprint and model hash.
        launch = prepare(s)
        target = serve.selfcheck_target(launch)
        if url:
            target = dataclasses.replace(target, url=url)
        sink = serve.open_sink(launch)
        context = serve.event_context(launch) if not isinstance(sink, serve.NullSink) else None
    else:
        debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
        logs.setup(env.log_format, debug=debug, redactor=redactor())
        target = selfcheck.Target(url=url, spec=SelfCheckSpec(), state_dir=env.state_path())
        sink, context = serve.NullSink(), None
    try:
        result = selfcheck.run(target, expected, concurrency=concurrency, requests=requests_)
        if context is not None:
            sink.emit(SelfCheck.of(context, result))
    finally:
        sink.close(timeout=3.0)
    if as_json:
        echo_json(result.model_dump(mode="json"))
    else:
        ratio = f"{result.ratio:.2f}" if result.ratio is not None else "n/a"
        click.echo(f"{result.verdict}: {result.throughput_tps:.1f} tok/s (ratio {ratio}) - {result.reason}")
        click.echo(f"  {result.requests} requests at concurrency {result.concurrency}, {result.errors} errors, "
                   f"{result.completion_tokens} output tokens, TTFT p50 {_ms(result.ttft_p50_ms)}")
    if result.verdict == "fail":
        raise SelfCheckFailed(f"selfcheck: fail: {result.reason}",
                              hint="the figures are above; `wrapper selfcheck --json` prints them all")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


COMMANDS: list[click.Command] = [selfcheck_cmd]
