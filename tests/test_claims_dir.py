"""Issue 15 item 20: any local user could drop a locked claim in the world-writable /tmp/wrapper-instances and
block any port or GPU. Claims now live in this user's 0700 directory; a foreign or stale claim is reported
in one line and not obeyed. The "other instance" is a real process holding a real flock."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from wrapper import settings
from wrapper.errors import ConfigError, PortInUse
from wrapper.launch import preflight

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="making a file owned by another user needs root")

# Writes a claim naming `pid` and `port` at `path`, locks it like a live instance, waits for stdin to close.
FORGER = textwrap.dedent(
    """
    import fcntl, json, os, sys
    path, pid, port, owner, pid_ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    claim = {"pid": pid, "profile": "squatter", "ports": {"llamacpp.port": port}, "devices": ["0"]}
    if pid_ns:
        claim["pid_ns"] = pid_ns
    os.write(fd, json.dumps(claim).encode())
    if owner >= 0:
        os.fchown(fd, owner, owner)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def forgers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _forge(procs: list[subprocess.Popen[str]], path: Path, pid: int, port: int, owner: int = -1,
           pid_ns: str = "") -> None:
    proc = subprocess.Popen([sys.executable, "-c", FORGER, str(path), str(pid), str(port), str(owner), pid_ns],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"


def _settings(tmp_path: Path, port: int, **env: str) -> settings.Settings:
    registry = write_registry(tmp_path / "profiles.yaml",
                              {"a": {**tiny_profile(tmp_path / "m.gguf", port), "gpu": {"device_ids": [0]}}})
    base = {k: v for k, v in os.environ.items() if k not in ("WRAPPER_RUNTIME_DIR", "XDG_RUNTIME_DIR", "TMPDIR")}
    return settings.build("a", str(registry), environ={**base, "WRAPPER_STATUS_PORT": "0", **env})


def test_default_claim_dir_is_private_to_this_user(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = _settings(tmp_path, free_port(), TMPDIR=str(tmp_path))
    with preflight.claim(s) as claim:
        directory = tmp_path / f"wrapper-{os.getuid()}"
        assert claim.path.parent == directory
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(claim.path.stat().st_mode) == 0o600


def test_xdg_runtime_dir_is_preferred(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    with preflight.claim(_settings(tmp_path, free_port(), XDG_RUNTIME_DIR=str(xdg), TMPDIR=str(tmp_path))) as claim:
        assert claim.path.parent == xdg / "wrapper"


def test_our_dir_open_to_others_is_tightened(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    directory = tmp_path / f"wrapper-{os.getuid()}"
    directory.mkdir()
    directory.chmod(0o1777)  # what the old default /tmp/wrapper-instances was
    with preflight.claim(_settings(tmp_path, free_port(), TMPDIR=str(tmp_path))):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


@needs_root
def test_claim_dir_planted_by_another_user_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    directory = tmp_path / f"wrapper-{os.getuid()}"
    directory.mkdir(mode=0o777)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"{directory}: owned by uid {NOBODY}, not by this user") as err:
        preflight.claim(_settings(tmp_path, free_port(), TMPDIR=str(tmp_path)))
    assert "\n" not in err.value.message


def test_symlink_in_place_of_the_claim_dir_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / f"wrapper-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a directory"):
        preflight.claim(_settings(tmp_path, free_port(), TMPDIR=str(tmp_path)))


@needs_root
def test_locked_claim_owned_by_another_user_is_reported_not_obeyed(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, forgers: list[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    port = free_port()
    forged = runtime / "instance-1-deadbeef.json"
    _forge(forgers, forged, os.getpid(), port, owner=NOBODY)  # a live pid, a live lock, someone else's file
    caplog.set_level(logging.WARNING, "wrapper.preflight")
    with preflight.claim(_settings(tmp_path, port, WRAPPER_RUNTIME_DIR=str(runtime))) as claim:
        assert claim.path.exists()
    lines = [r.getMessage() for r in caplog.records if str(forged) in r.getMessage()]
    assert lines == [f"ignoring instance claim {forged}: owned by uid {NOBODY}, not by this user (uid {os.getuid()})"]


def test_locked_claim_naming_a_dead_pid_is_reported_not_obeyed(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, forgers: list[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    port = free_port()
    forged = runtime / "instance-2-deadbeef.json"
    _forge(forgers, forged, dead.pid, port)
    caplog.set_level(logging.WARNING, "wrapper.preflight")
    with preflight.claim(_settings(tmp_path, port, WRAPPER_RUNTIME_DIR=str(runtime))) as claim:
        assert json.loads(claim.path.read_text())["ports"] == {"llamacpp.port": port}
    assert [r.getMessage() for r in caplog.records if str(forged) in r.getMessage()] == [
        f"ignoring instance claim {forged}: its pid {dead.pid} is not running (the lock is held by another process)"
    ]


def test_locked_claim_from_another_pid_namespace_is_obeyed(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, forgers: list[subprocess.Popen[str]],
) -> None:
    """Claims are shared between containers through a volume; each container has its own pid namespace, so the
    claimant's pid (often 7 in every container) cannot be checked from here: its held lock says it lives.
    Regression: the third container of scripts/container-e2e.sh took a port another container had claimed."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    port = free_port()
    _forge(forgers, runtime / "instance-7-0a0b0c0d.json", dead.pid, port, pid_ns="pid:[1]")
    assert preflight.pid_namespace() not in ("", "pid:[1]")
    with pytest.raises(PortInUse, match="already used by wrapper instance 'squatter'"):
        preflight.claim(_settings(tmp_path, port, WRAPPER_RUNTIME_DIR=str(runtime)))
