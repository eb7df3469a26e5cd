"""Warm start: `wrapper serve` spawns llama-server from the last start's command before it reads anything else.

The serve path spends ~0.3 s in Python (click, PyYAML, pydantic, the profile schema, prepare) before it knows
the command, while llama-server needs the CPU for its own load. When a start with the same inputs (wrapper
arguments, working directory, environment, registry file, model, binary) reached "ready" before, this module
spawns that command at once (stdlib only, ~0.06 s after the command starts); the full path then derives
the command as always and adopts the running child only if argv and environment are exactly what it derived.
Anything else (a changed registry, a new tuned config, a replan) stops the early child and starts the derived
one: a warm start can cost a restart, never a wrong server.

What keeps it safe:
- the record is written only after that command reached "ready", on a host without NVIDIA GPUs (a GPU
  placement depends on the memory free at each start), never for an argv with a secret in it, and not when
  the placement plan chose part of the command (the plan reads the free memory an early child would be using);
- secrets never reach the record: argv has none (keys go by --api-key-file), the child's environment is ours
  minus the names listed, and the fingerprint masks the value of every variable whose name looks secret;
- the binary, the registry, the model (every shard) and every other file named in argv must have the same
  size, mtime and inode as when that start became ready (a download replaces the file by rename, so a
  half-written file is never matched), and again when the child is adopted (prepare may re-download in place);
- the record and its folder must belong to this user and be writable by no one else; it is read through
  descriptors that follow no link, and must name its binary among the files it checks;
- llama-server's port must be free and claimed by no other live instance; WRAPPER_WARM_START=0 turns it off.

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
from pathlib import Path

from wrapper import __version__

TYPE_CHECKING = False  # typing itself costs ~4 ms to import, and this module runs before anything else
if TYPE_CHECKING:
    from typing import Any

# The exec shim every llama-server is spawned through (see its docstring: parent-death safeguard).
SHIM = Path(__file__).parent / "supervisor" / "_pdeathsig.py"
RECORDS = "warm"  # under the state dir
KEEP = 16  # records kept (one per distinct set of inputs)
# NVIDIA's driver talks through one of these: /dev/nvidiactl on Linux (the NVIDIA container runtime injects it),
# /dev/dxg under WSL2 (plan.hardware skips NVML without them too).
DRIVER_NODES = ("/dev/nvidiactl", "/dev/dxg")
_DEVICE_TREE = Path("/proc/device-tree/compatible")  # a Jetson's integrated GPU (no NVML there)
# Left out of the fingerprint: Docker sets HOSTNAME to the container's id, new for every container; a shell sets
# `_` to the path of the command it ran (`timeout`, `nohup`, the wrapper itself) and OLDPWD to where it was. The
# early child still gets the current values, and the adoption compares the whole environment: nothing is lost.
_VOLATILE = frozenset({"HOSTNAME", "_", "OLDPWD"})
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
# ... but these name a path or a number, whose value is no secret and does change the command (a key file).
_NOT_SECRET_ENDINGS = ("_FILE", "_OVERRIDE", "_PATH", "_TOKENS", "_DIR")


def state_dir(env: Mapping[str, str]) -> Path:
    """Where the wrapper keeps its own state: WRAPPER_STATE_DIR, else $XDG_STATE_HOME/wrapper, else
    ~/.local/state/wrapper (settings.Environment.state_path is this, for the environment it read)."""
    explicit = env.get("WRAPPER_STATE_DIR", "").strip()
    if explicit:
        return Path(explicit)
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


class Early:
    """llama-server spawned from a record, waiting for the full path to adopt or discard it. (A plain class:
    dataclasses and typing would add ~15 ms to the imports this module is kept free of.)"""

    def __init__(self, proc: subprocess.Popen[bytes], argv: list[str], env: dict[str, str], host: str, port: int,
                 *, files: list[tuple[str, list[int]]] | None = None) -> None:
        self.proc, self.argv, self.env, self.host, self.port = proc, argv, env, host, port
        self.files = files or []  # (path, id) as checked before the spawn
        self.started = time.monotonic()
        self.adopted = False  # the supervisor took it over
        self.stopped = False  # discarded

    @property
    def settled(self) -> bool:
        return self.adopted or self.stopped

    def alive(self) -> bool:
        return self.proc.poll() is None

    def changed_file(self) -> str | None:
        """A file the early child was matched on that is no longer the same (the full path re-downloaded the
        model at that path, a key file was rotated): its path, else None."""
        return next((path for path, known in self.files if _file_id(path) != known), None)

    def difference(self, argv: Sequence[str], env: Mapping[str, str]) -> str | None:
        """None when argv and environment are exactly these; else what differs, in words (names, no values)."""
        if list(argv) != self.argv:
            if len(argv) != len(self.argv):
                return f"the command has {len(argv)} arguments, the last start's had {len(self.argv)}"
            at = next(i for i, (a, b) in enumerate(zip(argv, self.argv, strict=True)) if a != b)
            # Name the flag, never a value (a flag's value may be a path or a key someone put in extra_args).
            flag = next((argv[i].partition("=")[0] for i in (at, at - 1) if i >= 0 and argv[i].startswith("-")), "")
            return f"the command differs at argument {at}" + (f" ({flag})" if flag else "")
        if dict(env) != self.env:
            names = sorted({k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)})
            return f"the environment differs in {', '.join(names[:5])}"
        return None

    def discard(self, grace_s: float = 5.0) -> None:
        """Stop the early child (not adopted): its pipes first, so it never blocks writing to them, then its
        whole group with SIGTERM, SIGKILL after the grace. Returns once it has exited (its port is free)."""
        if self.settled:
            return
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._kill()
            except BaseException:  # a second Ctrl-C while waiting: kill it, then go on with the interrupt
                self._kill()
                raise
        self.stopped = True

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.stopped = True


_early: Early | None = None
_inputs: tuple[dict[str, str], str] | None = None  # this start's environment and its record's name


def begin(args: Sequence[str]) -> None:
    """At the very start of `wrapper ...`: remember the inputs and, for `serve` with a matching record, spawn
    llama-server now. Never raises: a warm start that cannot happen is a normal start."""
    global _early, _inputs
    command = [a for a in args if a != "--debug"][:1]
    env = dict(os.environ)
    if command != ["serve"] or any(a in ("-h", "--help") for a in args) or not enabled(env):
        return
    try:
        _inputs = (env, fingerprint(args, env))
        _early = _start(env, _inputs[1])
    except Exception:  # a damaged record, an unreadable state dir, a deleted working directory: a normal start
        _early = None
    if _early is not None:
        # A way out before the serve command takes it (a usage error, an import error): no grace, no wait.
        atexit.register(_early.discard, 0.0)


def active() -> bool:
    """This process started through begin() as `serve` with warm starts on (records may be written)."""
    return _inputs is not None


def take() -> Early | None:
    """The early child, once (the serve command adopts or discards it)."""
    global _early
    early, _early = _early, None
    return early


def enabled(env: Mapping[str, str]) -> bool:
    return env.get("WRAPPER_WARM_START", "1").strip().lower() not in ("0", "false", "no", "off")


def nvidia_driver() -> bool:
    """One of NVIDIA's driver devices exists on this host (or in this container)."""
    return any(os.path.exists(node) for node in DRIVER_NODES)


def gpu_host() -> bool:
    """Any NVIDIA GPU this host could offload to (then placement depends on each start's free memory)."""
    if nvidia_driver():
        return True
    try:
        return b"nvidia,tegra" in _DEVICE_TREE.read_bytes()
    except OSError:
        return False


def fingerprint(args: Sequence[str], env: Mapping[str, str]) -> str:
    """The record's name for these inputs. Secret-looking variables count by name only."""
    shown = sorted((k, "<set>" if _secret(k) else v) for k, v in env.items() if k not in _VOLATILE)
    blob = json.dumps([__version__, sys.executable, os.getcwd(), list(args), shown]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _secret(name: str) -> bool:
    upper = name.upper()
    return any(w in upper for w in _SECRET_WORDS) and not upper.endswith(_NOT_SECRET_ENDINGS)


def _file_id(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev] if stat.S_ISREG(st.st_mode) else None


MAX_RECORD = 64 * 1024  # bytes; a record is ~1 KB


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record, read only through descriptors that follow no link, from a folder and a file that belong to
    this user and that no one else can write; None for anything else (missing, foreign, damaged)."""
    private = 0o022
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(dir_fd)
        if st.st_uid != os.getuid() or st.st_mode & private:
            return None
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & private or st.st_size > MAX_RECORD:
            return None
        record = json.loads(f.read(MAX_RECORD))
    return record if _well_formed(record) else None


def _well_formed(record: object) -> bool:
    def strings(x: object) -> bool:
        return isinstance(x, list) and all(isinstance(s, str) for s in x)

    if not isinstance(record, dict):
        return False
    files, env = record.get("files"), record.get("set")
    return (record.get("version") == __version__ and strings(record.get("argv")) and bool(record["argv"])
            and strings(record.get("drop")) and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(record.get("host"), str) and isinstance(record.get("port"), int)
            and isinstance(record.get("runtime_dir"), str) and isinstance(files, list)
            and all(isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("id"), list)
                    for f in files)
            and record["argv"][0] in {f["path"] for f in files})  # the binary it runs is one it checks


def bind_error(host: str, port: int) -> OSError | None:
    """Why host:port cannot be bound now (errno EADDRINUSE: something listens there; a socket.gaierror: the
    host does not resolve), or None. SO_REUSEADDR: a socket in TIME_WAIT from a just-stopped server is no clash."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


def pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"), or "" where /proc cannot tell."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def claimant_alive(pid: int, pid_ns: str) -> bool:
    """Whether the process an instance claim names still runs. A claim from another pid namespace (another
    container, claims shared through a volume) names a pid this one cannot see: taken as alive."""
    if pid_ns and pid_ns != pid_namespace():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # running, as another user
    return True


def _claimed_by_another(runtime_dir: str, port: int) -> bool:
    """A live instance has claimed this port (wrapper.launch.preflight's claim files): it may be downloading or
    in a restart backoff with the port unbound, and our early child must not take it meanwhile."""
    for path in Path(runtime_dir).glob("instance-*.json"):
        try:
            claim = json.loads(path.read_bytes()[:MAX_RECORD])
            pid, ports, pid_ns = int(claim["pid"]), claim["ports"], str(claim.get("pid_ns") or "")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if isinstance(ports, dict) and port in ports.values() and claimant_alive(pid, pid_ns):
            return True
    return False


def _start(env: dict[str, str], name: str) -> Early | None:
    if gpu_host():
        return None
    try:
        record = _read_record(_record_path(env, name))
    except FileNotFoundError:
        return None
    if record is None:
        return None
    files = [(f["path"], f["id"]) for f in record["files"]]
    if any(_file_id(path) != known for path, known in files):
        return None  # the registry, model, binary or a key file changed since that start
    host, port = record["host"], record["port"]
    if bind_error(host, port) is not None or _claimed_by_another(record["runtime_dir"], port):
        return None  # someone holds or claimed the port: the full path says who, with the usual error
    child_env = {k: v for k, v in env.items() if k not in record["drop"]} | record["set"]
    argv = list(record["argv"])
    return Early(popen(argv, child_env), argv, child_env, host, port, files=files)


def remember(argv: Sequence[str], child_env: Mapping[str, str], *, set_env: Mapping[str, str],
             drop: Sequence[str], host: str, port: int, files: Sequence[str | Path],
             runtime_dir: Path) -> Path | None:
    """Record a command that reached "ready" for the next start with this process's inputs; None when this
    process was not started through begin() (a library caller) or the record cannot be checked next time.
    argv must carry no secret and child_env must be the inputs' environment minus `drop` plus `set_env`."""
    if _inputs is None:
        return None
    env, name = _inputs
    if {k: v for k, v in env.items() if k not in drop} | dict(set_env) != dict(child_env):
        return None  # the child's environment is not derivable from ours alone: never warm-start it
    ids = [(str(Path(f).absolute()), _file_id(str(f))) for f in [argv[0], *files]]
    record = {"version": __version__, "argv": list(argv), "set": dict(set_env), "drop": sorted(drop), "host": host,
              "port": port, "runtime_dir": str(runtime_dir),
              "files": [{"path": p, "id": i} for p, i in dict(ids).items() if i is not None], "written": time.time()}
    if not _well_formed(record):
        return None  # e.g. the binary is not a plain file we can check next time
    import tempfile  # here, not at the top: the early spawn's imports are the start's cost

    path = _record_path(env, name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")  # replicas may share the folder
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _prune(path.parent)
    return path


def touch() -> None:
    """The record this start was warm-started from is in use: keep it among the newest (pruning goes by age)."""
    if _inputs is not None:
        with contextlib.suppress(OSError):
            os.utime(_record_path(*_inputs))


def forget() -> None:
    """Drop the record for this process's inputs (its command failed, or was rolled back)."""
    if _inputs is not None:
        with contextlib.suppress(OSError):
            _record_path(*_inputs).unlink()


def _record_path(env: Mapping[str, str], name: str) -> Path:
    return state_dir(env) / RECORDS / f"{name}.json"


def _prune(directory: Path) -> None:
    def age(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed by another instance meanwhile
            return 0.0

    for old in sorted(directory.glob("*.json"), key=age, reverse=True)[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()
