"""`wrapper fetch`: make sure the profile's model is on disk and verified (download it if needed)."""

from __future__ import annotations

import click

from wrapper.cli.common import echo_json, load_settings, profile_options
from wrapper.launch.prepare import fetch_companions
from wrapper.model import acquire


@click.command("fetch")
@profile_options
@click.option("--json", "as_json", is_flag=True, help="Print the verified file(s), size and sha256 as JSON.")
def fetch_cmd(profile_name: str | None, config_path: str | None, as_json: bool) -> None:
    """Download (if missing) and verify the profile's model; exit 3 when it cannot be had intact."""
    s = load_settings(profile_name, config_path)
    model = acquire.ensure(s)
    companions = fetch_companions(s)  # the projector and draft model, verified the same way
    if as_json:
        echo_json(
            {
                "profile": s.profile_name,
                "path": str(model.path),
                "shards": [str(p) for p in model.shards],
                "size": model.size,
                "sha256": model.sha256,
                "source": model.source,
                "companions": [{"setting": c.setting, "path": str(c.file.path), "size": c.file.size,
                                "sha256": c.file.sha256, "source": c.file.source} for c in companions],
            }
        )
        return
    shards = f" ({len(model.shards)} shards)" if len(model.shards) > 1 else ""
    click.echo(f"{model.path}{shards}: {model.size} bytes, sha256 {model.sha256} ({model.source})")
    for c in companions:
        click.echo(f"{c.file.path} ({c.setting}): {c.file.size} bytes, sha256 {c.file.sha256} ({c.file.source})")


COMMANDS = [fetch_cmd]
