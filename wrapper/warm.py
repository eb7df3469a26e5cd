"""Warm start: `wrapper serve` spawns llama-server from the last start's command before it reads anything else.

The serve path spends ~0.3 s in Python (click, PyYAML, pydantic, the profile schema, prepare) before it knows
the command, while llama-server needs the CPU for its own load. When a start with the same inputs (wrapper
arguments, working directory, environment, registry file, model, binary) reached "ready" before, this module
spawns that command at once (stdlib only, ~30 ms after the interpreter starts); the full path then derives
the command as always and adopts the running child only if argv and environment are exactly what it derived.
Anything else (a changed registry, a new tuned config, a replan) stops the early child and starts the derived
one: a warm start can cost a restart, never a wrong server.

What keeps it safe:
- the record is written only after that command reached "ready", on a host without NVIDIA GPUs (a GPU
  placement depends on the memory free at each start), and never for an argv with a secret in it;
- secrets never reach the record: argv has none (keys go by --api-key-file), the child's environment is ours
  minus the names listed, and the fingerprint masks the value of every variable whose name looks secret;
- the model and every other file named in argv must have the same size, mtime and inode as when that start
  became ready (a download replaces the file by rename, so a half-written file is never matched);
- the record and its folder must belong to this user and be writable by no one else;
- llama-server's port must be free; WRAPPER_WARM_START=0 turns it off.

This is the one module besides wrapper.settings that reads the environment, and it reads it whole: for the
fingerprint and as the child's environment, never one setting (settings does that).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wrapper import __version__

# The exec shim every llama-server is spawned through (see its docstring: parent-death safeguard).
SHIM = Path(__file__).parent / "supervisor" / "_pdeathsig.py"
RECORDS = "warm"  # under the state dir
KEEP = 16  # records kept (one per distinct set of inputs)
_GPU_NODES = ("/dev/nvidiactl", "/dev/dxg")  # NVIDIA's driver, and WSL's GPU bridge
_DEVICE_TREE = Path("/proc/device-tree/compatible")  # a Jetson's integrated GPU (no NVML there)
# Left out of the fingerprint: Docker sets HOSTNAME to the container's id, new for every container. The early
# child still gets the current value, and the adoption compares the whole environment, so nothing is lost.
_VOLATILE = frozenset({"HOSTNAME"})
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDS", "CREDENTIAL", "AUTH")


def state_dir(env: Mapping[str, str]) -> Path:
    """Where the wrapper keeps its own state: WRAPPER_STATE_DIR, else $XDG_STATE_HOME/wrapper, else
    ~/.local/state/wrapper (settings.Environment.state_path is this, for the environment it read)."""
    if env.get("WRAPPER_STATE_DIR"):
        return Path(env["WRAPPER_STATE_DIR"])
    xdg = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "/tmp")) / ".local/state")
    return Path(xdg) / "wrapper"


def popen(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """llama-server through the exec shim, in its own process group, output on pipes (supervisor.process)."""
    shim = [sys.executable, "-I", "-S", str(SHIM), str(os.getpid())]
    return subprocess.Popen(
        shim + list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        process_group=0,
        close_fds=True,
    )


@dataclass
class Early:
    """llama-server spawned from a record, waiting for the full path to adopt or discard it."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    started: float = field(default_factory=time.monotonic)
    adopted: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def difference(self, argv: Sequence[str], env: Mapping[str, str]) -> str | None:
        """None when argv and environment are exactly these; else what differs, in words (names, no values)."""
        if list(argv) != self.argv:
            if len(argv) != len(self.argv):
                return f"the command has {len(argv)} arguments, the last start's had {len(self.argv)}"
            at = next(i for i, (a, b) in enumerate(zip(argv, self.argv, strict=True)) if a != b)
            flag = argv[at - 1] if at and argv[at - 1].startswith("-") else argv[at]
            return f"the command differs at argument {at} ({flag})"
        if dict(env) != self.env:
            names = sorted({k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)})
            return f"the environment differs in {', '.join(names[:5])}"
        return None

    def discard(self, grace_s: float = 5.0) -> None:
        """Stop the early child (not adopted): its pipes first, so it never blocks writing to them, then its
        whole group with SIGTERM, SIGKILL after the grace. Returns once it has exited (its port is free)."""
        if self.adopted:
            return
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.adopted = True  # nothing left to discard


_early: Early | None = None
_inputs: tuple[dict[str, str], str] | None = None  # this start's environment and its record's name


def begin(args: Sequence[str]) -> None:
    """At the very start of `wrapper ...`: remember the inputs and, for `serve` with a matching record, spawn
    llama-server now. Never raises: a warm start that cannot happen is a normal start."""
    global _early, _inputs
    command = [a for a in args if a != "--debug"][:1]
    if command != ["serve"] or any(a in ("-h", "--help") for a in args):
        return
    env = dict(os.environ)
    _inputs = (env, fingerprint(args, env))
    try:
        _early = _start(env, _inputs[1])
    except Exception:  # a damaged record, an unreadable state dir: start the normal way
        _early = None
    if _early is not None:
        atexit.register(_early.discard)


def take() -> Early | None:
    """The early child, once (the serve command adopts or discards it)."""
    global _early
    early, _early = _early, None
    return early


def enabled(env: Mapping[str, str]) -> bool:
    return env.get("WRAPPER_WARM_START", "1").strip().lower() not in ("0", "false", "no", "off")


def gpu_host() -> bool:
    """Any NVIDIA GPU this host could offload to (then placement depends on each start's free memory)."""
    if any(os.path.exists(node) for node in _GPU_NODES):
        return True
    try:
        return b"nvidia,tegra" in _DEVICE_TREE.read_bytes()
    except OSError:
        return False


def fingerprint(args: Sequence[str], env: Mapping[str, str]) -> str:
    """The record's name for these inputs. Secret-looking variables count by name only."""
    shown = sorted((k, "<set>" if any(w in k.upper() for w in _SECRET_WORDS) else v) for k, v in env.items()
                   if k not in _VOLATILE)
    blob = json.dumps([__version__, sys.executable, os.getcwd(), list(args), shown]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _file_id(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev] if stat.S_ISREG(st.st_mode) else None


def _private(path: Path) -> bool:
    st = path.lstat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def _start(env: dict[str, str], name: str) -> Early | None:
    if not enabled(env) or gpu_host():
        return None
    directory = state_dir(env) / RECORDS
    path = directory / f"{name}.json"
    if not path.is_file() or not _private(directory) or not _private(path):
        return None
    record = json.loads(path.read_text())
    if any(_file_id(f["path"]) != f["id"] for f in record["files"]):
        return None  # the registry, model or binary changed since that start
    if not _bindable(record["host"], record["port"]):
        return None  # someone holds the port: the full path says who, with the usual error
    child_env = {k: v for k, v in env.items() if k not in record["drop"]} | record["set"]
    return Early(popen(record["argv"], child_env), list(record["argv"]), child_env, record["host"], record["port"])


def remember(argv: Sequence[str], child_env: Mapping[str, str], *, set_env: Mapping[str, str],
             drop: Sequence[str], host: str, port: int, files: Sequence[str | Path]) -> Path | None:
    """Record a command that reached "ready" for the next start with this process's inputs; None when this
    process was not started through begin() (a library caller) or the record cannot be checked next time.
    argv must carry no secret and child_env must be the inputs' environment minus `drop` plus `set_env`."""
    if _inputs is None:
        return None
    env, name = _inputs
    if not enabled(env):
        return None
    if {k: v for k, v in env.items() if k not in drop} | dict(set_env) != dict(child_env):
        return None  # the child's environment is not derivable from ours alone: never warm-start it
    ids = [(str(Path(f).absolute()), _file_id(str(f))) for f in files]
    record = {"version": __version__, "argv": list(argv), "set": dict(set_env), "drop": sorted(drop), "host": host,
              "port": port, "files": [{"path": p, "id": i} for p, i in ids if i is not None],
              "written": time.time()}
    directory = state_dir(env) / RECORDS
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)
    os.replace(tmp, path)
    _prune(directory)
    return path


def forget() -> None:
    """Drop the record for this process's inputs (its command failed, or was rolled back)."""
    if _inputs is not None:
        with contextlib.suppress(OSError):
            (state_dir(_inputs[0]) / RECORDS / f"{_inputs[1]}.json").unlink()


def _prune(directory: Path) -> None:
    records = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in records[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()
