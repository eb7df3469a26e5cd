"""Many instances on one host: catch a port or GPU-pin clash before llama-server is launched.

Every running `wrapper serve` registers a small claim file (pid, profile, ports, CUDA devices) in a
runtime directory and holds an exclusive `flock` on it for its whole life. The kernel drops the lock
when the process dies, however it dies, so a claim whose lock can be taken belongs to a crashed
instance: it is stale, ignored and removed. Checking the others and writing our own claim happen under
one directory lock, so two instances started in the same second cannot both take GPU 0.

The directory is this user's own, mode 0700: `WRAPPER_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/wrapper`,
else `$TMPDIR/wrapper-<uid>` (default /tmp). It used to be a world-writable /tmp/wrapper-instances,
where any local user could drop a locked claim and block any port or GPU (issue 15 item 20). A
directory owned by someone else is refused; a claim file owned by another user, or naming a pid that
is not running, is reported in one line and not obeyed. Instances of different users no longer see
each other's claims: the bind test below still catches their ports, and GPUs shared across users need
the scheduler that hands them out.

Containers on one host share the directory through a volume mounted into each of them (the image sets
WRAPPER_RUNTIME_DIR=/run/wrapper, owned by the image's user; compose mounts the named volume
`wrapper-instances` there). flock works across containers because they share the host's kernel. A GPU
is claimed by its NVML UUID when the host was measured: container-local indices and the two spellings of
CUDA_VISIBLE_DEVICES (index or UUID) name the same device the same way, and a pin to a GPU this host
does not have claims nothing, so it never blocks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from wrapper.errors import ConfigError, PortInUse
from wrapper.settings import Settings
from wrapper.warm import bind_error, claimant_alive, pid_namespace

if TYPE_CHECKING:
    from wrapper.plan.hardware import Hardware

log = logging.getLogger("wrapper.preflight")

_DIR_LOCK = ".lock"
_CUDA_HIDE_ALL = {"", "-1", "none", "void"}


@dataclass(frozen=True)
class Needs:
    """What an instance is about to take: ports (name -> (host, port)) and CUDA devices."""

    profile: str
    ports: dict[str, tuple[str, int]]
    devices: tuple[str, ...]
    allow_gpu_sharing: bool = False
    pin: str | None = None  # CUDA_VISIBLE_DEVICES as the child gets it, for messages


@dataclass(frozen=True)
class Other:
    """A live claim of another instance, read from its file."""

    path: Path
    pid: int
    profile: str
    ports: dict[str, int]
    devices: tuple[str, ...]

    host: str = ""
    pid_ns: str = ""  # the claimant's pid namespace; its pid means nothing in another one (another container)

    def describe(self) -> str:
        # The pid is in the claimant's own namespace: with the host name a container's claim can be found.
        return f"wrapper instance '{self.profile}' (pid {self.pid})" + (f" on {self.host}" if self.host else "")


def runtime_dir(s: Settings) -> Path:
    """This user's claim directory (see the module docstring for the order)."""
    if s.env.runtime_dir:
        return Path(s.env.runtime_dir)
    xdg = s.env.base.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg) / "wrapper"
    return Path(s.env.base.get("TMPDIR") or "/tmp") / f"wrapper-{os.getuid()}"


def parse_devices(value: str | None) -> tuple[str, ...]:
    """CUDA_VISIBLE_DEVICES -> device ids; hidden (-1, empty) or unset means no pin."""
    if value is None or value.strip().lower() in _CUDA_HIDE_ALL:
        return ()
    return tuple(d.strip() for d in value.split(",") if d.strip())


def gpu_identities(s: Settings, host: Hardware | None) -> tuple[str, ...]:
    """The GPUs the child is pinned to, as claims name them. With the host measured (its GPUs are the
    visible ones, NVML index = host index): their UUIDs, and nothing for a pin this host cannot satisfy.
    Without a measurement: the pin as written."""
    # The child inherits CUDA_VISIBLE_DEVICES when nothing pins it; an inherited pin is still a pin.
    devices = parse_devices(s.cuda_visible_devices)
    if host is None or not devices:
        return devices
    return tuple(g.uuid or f"index:{g.index}" for g in host.gpus)


def needs_of(s: Settings, host: Hardware | None = None) -> Needs:
    ports = {"llamacpp.port": (s.server.host, int(s.server.port))}
    if s.env.status_port:
        ports["WRAPPER_STATUS_PORT"] = (s.env.status_host, s.env.status_port)
    devices = gpu_identities(s, host)
    return Needs(profile=s.profile_name, ports=ports, devices=devices, allow_gpu_sharing=s.env.allow_gpu_sharing,
                 pin=s.cuda_visible_devices)


def check(s: Settings, host: Hardware | None = None) -> None:
    """Raise PortInUse / ConfigError if this instance would clash with another one or a bound port."""
    _check(needs_of(s, host), list(_live_claims(runtime_dir(s), remove_stale=False)))


@dataclass
class Claim:
    """This instance's registration; keep it for the life of the instance, then `release()`."""

    path: Path
    needs: Needs
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim(s: Settings, host: Hardware | None = None, held: tuple[str, int] | None = None) -> Claim:
    """Check for clashes and register this instance, atomically with respect to other instances.
    `host`: this machine as measured for the launch; GPUs are then claimed by UUID (see gpu_identities).
    `held`: a host:port our own early llama-server already listens on (wrapper.warm): not a clash with
    anything but another instance's claim."""
    directory = runtime_dir(s)
    needs = needs_of(s, host)
    _ensure_dir(directory, explicit=bool(s.env.runtime_dir))
    with _dir_lock(directory):
        _check(needs, list(_live_claims(directory, remove_stale=True)), held)
        # pid + random suffix: one process (a bench sweep) may hold several claims in turn.
        path = directory / f"instance-{os.getpid()}-{secrets.token_hex(4)}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "pid_ns": pid_namespace(),
            "profile": needs.profile,
            "ports": {name: port for name, (_, port) in needs.ports.items()},
            "devices": list(needs.devices),
            "started_at": time.time(),
        }
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    log.debug("registered %s in %s", record, directory)
    return Claim(path=path, needs=needs, _fd=fd)


def check_build(s: Settings, host: Hardware, binary: str) -> None:
    """Raise BinaryError when llama-server's CUDA build cannot run on the GPUs it is pinned to (see cuda_arch).
    Only for a profile that offloads: a CPU-only profile never touches the GPU."""
    from wrapper.launch import cuda_arch
    from wrapper.plan.hardware import tegra_gpu

    hidden = s.cuda_visible_devices is not None and not parse_devices(s.cuda_visible_devices)
    if s.server.n_gpu_layers == 0 or hidden:
        return
    gpus = [(g.name, g.compute_capability) for g in host.gpus]
    if not gpus and (tegra := tegra_gpu()) is not None:
        gpus = [tegra]
    note = cuda_arch.check(binary, gpus)
    if note:
        log.info("preflight: %s", note)


def _check(needs: Needs, others: list[Other], held: tuple[str, int] | None = None) -> None:
    _check_self(needs)
    for name, (host, port) in needs.ports.items():
        for other in others:
            if port in other.ports.values():
                raise PortInUse(
                    f"{name}={port}: already used by {other.describe()}",
                    hint=f"give profile '{needs.profile}' another port ({_override_var(name)}) or stop that instance",
                )
        if (host, port) != held:
            check_bindable(name, host, port, needs.profile)
    if needs.devices and not needs.allow_gpu_sharing:
        for other in others:
            shared = sorted(set(needs.devices) & set(other.devices))
            if shared:
                pinned = needs.pin if needs.pin and needs.pin != ",".join(needs.devices) else None
                named = f" (CUDA_VISIBLE_DEVICES={pinned})" if pinned else ""
                raise ConfigError(
                    f"CUDA device {','.join(shared)}{named}: already pinned by {other.describe()}",
                    hint="pin another GPU (gpu.device_ids or CUDA_VISIBLE_DEVICES_OVERRIDE), stop that instance, "
                    "or set WRAPPER_ALLOW_GPU_SHARING=1 if both models fit on the device",
                )


def _check_self(needs: Needs) -> None:
    seen: dict[int, str] = {}
    for name, (_, port) in needs.ports.items():
        if port in seen:
            raise PortInUse(
                f"{name}={port}: the same port as {seen[port]}",
                hint="llama-server and the wrapper's status server need two different ports",
            )
        seen[port] = name


def _override_var(name: str) -> str:
    return "LLAMACPP_PORT_OVERRIDE" if name == "llamacpp.port" else name


def check_bindable(name: str, host: str, port: int, profile: str) -> None:
    """Raise PortInUse when something already listens on host:port (`name` is the setting it came from)."""
    exc = bind_error(host, port)
    if exc is None:
        return
    if isinstance(exc, socket.gaierror):
        raise ConfigError(f"{name}: host {host!r} does not resolve ({exc.strerror})") from None
    if exc.errno == errno.EADDRINUSE:
        raise PortInUse(
            f"{name}={port}: {host}:{port} is already in use by another process",
            hint=f"find it with `ss -ltnp 'sport = :{port}'`, or give profile '{profile}' another port "
            f"({_override_var(name)})",
        ) from None
    if exc.errno == errno.EACCES:
        raise PortInUse(
            f"{name}={port}: permission denied binding {host}:{port}",
            hint="ports below 1024 need privileges; use a higher port",
        ) from None
    # Anything else (address not on this host, ...) is llama-server's to report in its own words.
    log.debug("bind test of %s:%s skipped: %s", host, port, exc)


def _ensure_dir(directory: Path, explicit: bool) -> None:
    """Create the directory (0700) or check the one there: ours, a real directory, not open to others."""
    where = f"WRAPPER_RUNTIME_DIR={directory}" if explicit else f"instance claim directory {directory}"
    hint = "remove it, or point WRAPPER_RUNTIME_DIR at a directory of your own"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        info = directory.lstat()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create ({exc.strerror})", hint=hint) from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{where}: not a directory (a symlink or a file put there?)", hint=hint)
    if info.st_uid != os.getuid():
        raise ConfigError(f"{where}: owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); claims "
                          "there could be forged", hint=hint)
    if info.st_mode & 0o077:
        # Ours but open to others (made by an older version, or by hand): others could drop claims in it.
        try:
            directory.chmod(0o700)
        except OSError as exc:
            raise ConfigError(f"{where}: mode {stat.S_IMODE(info.st_mode):o} lets other users write claims, and "
                              f"it cannot be tightened to 700 ({exc.strerror})", hint=hint) from None
        log.info("%s: tightened mode %o to 700", where, stat.S_IMODE(info.st_mode))


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory / _DIR_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"WRAPPER_RUNTIME_DIR={str(directory)!r}: not writable ({exc.strerror})",
            hint="point WRAPPER_RUNTIME_DIR at a writable directory shared by this host's instances",
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _live_claims(directory: Path, remove_stale: bool) -> Iterator[Other]:
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("instance-*.json")):
        other = _read_live(path, remove_stale)
        if other is not None:
            yield other


def _read_live(path: Path, remove_stale: bool) -> Other | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # removed meanwhile, or a symlink: not a claim we made
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.getuid():
            log.warning("ignoring instance claim %s: owned by uid %d, not by this user (uid %d)", path, owner,
                        os.getuid())
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _obeyed(_parse(path))  # locked: its owner is alive
        # We got the lock: the owner died without releasing, so its claim no longer holds. Only a caller
        # holding the directory lock may delete it: a claim being created is unlocked for a moment.
        if remove_stale:
            log.info("removing stale instance claim %s (its process is gone)", path)
            with contextlib.suppress(OSError):
                path.unlink()
        return None
    finally:
        os.close(fd)


def _obeyed(other: Other | None) -> Other | None:
    """A locked claim whose pid is not running: another process holds the lock, not the instance it names.
    Only checked within one pid namespace: a claim from another container (claims are shared through a volume)
    names a pid this container cannot see, and its held lock is the proof that it lives."""
    if other is None or claimant_alive(other.pid, other.pid_ns):
        return other
    log.warning("ignoring instance claim %s: its pid %d is not running (the lock is held by another process)",
                other.path, other.pid)
    return None


def _parse(path: Path) -> Other | None:
    try:
        data: Any = json.loads(path.read_text())
        return Other(
            path=path,
            pid=int(data["pid"]),
            profile=str(data["profile"]),
            ports={str(k): int(v) for k, v in dict(data["ports"]).items()},
            devices=tuple(str(d) for d in data.get("devices", [])),
            host=str(data.get("host", "")),
            pid_ns=str(data.get("pid_ns", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        # A live owner still writing its claim (it holds the lock before writing): nothing to compare yet.
        log.debug("unreadable instance claim %s", path)
        return None
