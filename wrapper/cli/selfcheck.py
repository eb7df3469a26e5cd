"""`wrapper selfcheck`: the short throughput check against a running llama-server.

Exit status: 0 for pass or degraded, 1 for fail, 4 when the server does not answer.
"""

from __future__ import annotations

import click

from wrapper import logs, settings
from wrapper.cli.common import echo_json, load_settings, profile_options
from wrapper.events import publisher
from wrapper.measure import selfcheck


def _local_url(s: settings.Settings) -> str:
    host = s.server.host if s.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{s.server.port}"


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
    s: settings.Settings | None = None
    if profile_name or settings.Environment.from_environ().profile_name or not url:
        s = load_settings(profile_name, config_path)
    else:
        debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
        logs.setup(settings.Environment.from_environ().log_format, debug=debug)
    if url:
        target = url
    else:
        assert s is not None  # loaded above whenever url is missing
        target = _local_url(s)
    pub = publisher.Publisher.from_settings(s) if s is not None else None
    try:
        result = selfcheck.run(target, s, expected, concurrency=concurrency, requests=requests_, publisher=pub)
    finally:
        if pub is not None:
            pub.close(timeout=3.0)
    if as_json:
        echo_json(result.model_dump(mode="json"))
    else:
        ratio = f"{result.ratio:.2f}" if result.ratio is not None else "n/a"
        click.echo(f"{result.verdict}: {result.throughput_tps:.1f} tok/s (ratio {ratio}) - {result.reason}")
        click.echo(f"  {result.requests} requests at concurrency {result.concurrency}, {result.errors} errors, "
                   f"{result.completion_tokens} output tokens, TTFT p50 {_ms(result.ttft_p50_ms)}")
    if result.verdict == "fail":
        raise SystemExit(1)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


COMMANDS: list[click.Command] = [selfcheck_cmd]
