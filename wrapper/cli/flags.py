"""`wrapper flags`: print the exact llama-server command line and env `serve` would run."""

from __future__ import annotations

import shlex

import click

from wrapper.cli.common import echo_json, load_settings, profile_options
from wrapper.launch.prepare import prepare


@click.command("flags")
@profile_options
@click.option("--auto-tune", is_flag=True, help="Apply the best tuned config, as `serve --auto-tune` would.")
@click.option("--json", "as_json", is_flag=True, help="argv, env and each value's origin as JSON.")
def flags_cmd(profile_name: str | None, config_path: str | None, auto_tune: bool, as_json: bool) -> None:
    """Print the llama-server command and env that `serve` would run; runs nothing."""
    s = load_settings(profile_name, config_path)
    launch = prepare(s, auto_tune=auto_tune or None)
    cmd = launch.command
    if as_json:
        echo_json(
            {
                "profile": s.profile_name,
                "argv": cmd.redacted_argv(),
                "env": cmd.env,
                "env_removed": list(cmd.dropped_env),
                "binary_version": launch.capabilities.version,
                "origins": [
                    {"flag": a.flag, "value": a.value, "setting": a.knob, "origin": a.origin} for a in cmd.args
                ],
                "decisions": list(launch.decisions),
                "cuda_visible_devices": {"value": s.cuda_visible_devices, "origin": s.cuda_origin},
                "url": launch.url,
            }
        )
        return
    for key, value in sorted(cmd.env.items()):
        click.echo(f"{key}={shlex.quote(value)} \\")
    click.echo(shlex.join(cmd.redacted_argv()))
    for decision in launch.decisions:
        click.echo(f"# {decision}")


COMMANDS = [flags_cmd]
