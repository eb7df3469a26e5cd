""".env.example documents every variable the wrapper reads and every one the compose files use.

The list of what the code reads is taken from the code itself (settings.py is the only reader of the
environment, plus the generated override variables), so a new variable without documentation fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO
from wrapper.settings import override_variables

# Read by the code but owned by the system, not by an operator of the wrapper.
SYSTEM = {"HOME", "PATH", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "TMPDIR", "CUDA_VISIBLE_DEVICES"}
_ASSIGN = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
_READ = re.compile(r"""(?:\bget|environ\.get|getenv|environ\[)\(?\s*["']([A-Z][A-Z0-9_]+)["']""")
_COMPOSE_VAR = re.compile(r"\$\{([A-Z][A-Z0-9_]*)")


def documented() -> dict[str, str]:
    out = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        m = _ASSIGN.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def read_by_code() -> set[str]:
    names = set(override_variables())
    for path in (REPO / "wrapper").rglob("*.py"):
        names |= set(_READ.findall(path.read_text()))
    return names - SYSTEM


def test_every_variable_the_code_reads_is_documented() -> None:
    missing = sorted(read_by_code() - set(documented()))
    assert not missing, f".env.example lacks {missing}"


def test_the_code_scan_finds_the_known_variables() -> None:
    # Guards the scan itself: if the regex stopped matching, the test above would pass vacuously.
    found = read_by_code()
    for name in (
        "LLM_PROFILE_NAME",
        "HF_TOKEN",
        "WRAPPER_STATUS_PORT",
        "LLAMACPP_CTX_SIZE_OVERRIDE",
        "CUDA_VISIBLE_DEVICES_OVERRIDE",
        "WRAPPER_RUNTIME_DIR",
        "NATS_URL",
    ):
        assert name in found


def test_every_compose_variable_is_documented() -> None:
    used: set[str] = set()
    for path in REPO.glob("docker-compose*.yml"):
        used |= set(_COMPOSE_VAR.findall(path.read_text()))
    assert "LLM_PROFILE_NAME" in used
    missing = sorted(used - set(documented()))
    assert not missing, f".env.example lacks compose variables {missing}"


def test_everything_is_blank_by_default() -> None:
    values = documented()
    assert len(values) > 50
    assert {k: v for k, v in values.items() if v.strip()} == {}


def test_each_variable_has_one_line() -> None:
    names = [m.group(1) for line in (REPO / ".env.example").read_text().splitlines() if (m := _ASSIGN.match(line))]
    assert len(names) == len(set(names)), "duplicate entries in .env.example"


def test_blank_example_builds_the_same_settings_as_no_env(tmp_path: Path) -> None:
    # "Blank = unset": a copied, untouched .env.example must change nothing.
    from wrapper import settings

    environ = {"HOME": str(tmp_path), **dict.fromkeys(documented(), "")}
    environ["LLM_PROFILE_NAME"] = "tiny-dense"
    registry = str(REPO / "config" / "llm_profiles.yaml")
    blank = settings.build(config_path=registry, environ=environ)
    bare = settings.build(config_path=registry, environ={"HOME": str(tmp_path), "LLM_PROFILE_NAME": "tiny-dense"})
    assert blank.profile == bare.profile
    assert blank.origins == bare.origins
    assert blank.cuda_visible_devices == bare.cuda_visible_devices
