"""Options and helpers shared by the commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from wrapper import logs, settings

F = TypeVar("F", bound=Callable[..., Any])


def profile_options(func: F) -> F:
    """--profile and --config, defaulting to LLM_PROFILE_NAME and LLM_PROFILES_CONFIG_PATH."""
    func = click.option(
        "--config", "config_path", metavar="PATH", help="Profile registry (default: LLM_PROFILES_CONFIG_PATH, "
        "then ./config/llm_profiles.yaml, then /app/config/llm_profiles.yaml)."
    )(func)
    func = click.option("--profile", "profile_name", metavar="NAME", help="Profile (default: LLM_PROFILE_NAME).")(
        func
    )
    return func


def environment() -> settings.Environment:
    """The process environment, read once at the CLI's root (wrapper.cli.main) and handed down."""
    root = click.get_current_context().find_root()
    root.ensure_object(dict)
    env = root.obj.get("env")
    if env is None:
        env = root.obj["env"] = settings.Environment.from_environ()
    return cast(settings.Environment, env)


def redactor() -> logs.Redactor:
    """The process's one redactor, made at the CLI's root (wrapper.cli.main)."""
    root = click.get_current_context().find_root()
    root.ensure_object(dict)
    found = root.obj.get("redactor")
    if found is None:
        found = root.obj["redactor"] = logs.Redactor()
    return cast(logs.Redactor, found)


def load_settings(profile_name: str | None, config_path: str | None) -> settings.Settings:
    s = settings.build(profile_name=profile_name, config_path=config_path, env=environment())
    debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
    logs.setup(s.env.log_format, debug=debug, secrets=logs.secrets_of(s), redactor=redactor())
    return s


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
