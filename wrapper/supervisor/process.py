"""One llama-server child: its own process group, a parent-death safeguard, and non-blocking log readers.

The child gets its own process group so a terminal's Ctrl-C does not reach it directly: llama-server
exits hard on a second SIGINT, so it must receive exactly one signal, from us, to the whole group.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from wrapper import logs, warm
from wrapper.supervisor.classify import OOM_KILLED

child_log = logging.getLogger("wrapper.llama")
log = logging.getLogger("wrapper.supervisor")

# llama.cpp log lines look like "0.00.004.222 E srv ...": map its level letter onto ours.
_LEVELS = {"E": logging.ERROR, "W": logging.WARNING, "D": logging.DEBUG}


class Child:
    """Spawn, read, signal and reap one process. All methods may be called from the supervisor thread;
    the reader, emitter and waiter threads only touch the queue, the tail and `last_output`."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        wake: Callable[[], None],
        *,
        tail_lines: int = 100,
        queue_lines: int = 4000,
        max_line: int = 4096,
        log_path: Path | None = None,
        echo: bool = True,
        redactor: logs.Redactor | None = None,
    ) -> None:
        """`log_path`: also write every (redacted) line to this file, so the output outlives the run.
        `echo=False`: do not re-emit lines on the `wrapper.llama` logger; a sweep starts dozens of servers
        and keeps their output in files, not on the console. `redactor`: the process's one redactor (the
        CLI's), so a key the child prints is hidden in the log, the tail and error messages alike."""
        self._redactor = redactor if redactor is not None else logs.Redactor()
        self.argv = list(argv)
        self.env = dict(env)
        self._wake = wake
        self._max_line = max_line
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._lines: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=queue_lines)
        self.dropped = 0  # lines not re-emitted because our log sink fell behind a flooding child
        self.last_output = time.monotonic()
        self.started = time.monotonic()
        self._proc: subprocess.Popen[bytes] | None = None
        self._threads: list[threading.Thread] = []
        self._signal_lock = threading.Lock()
        self._log_path = log_path
        self._log_file: IO[str] | None = None
        self._log_lock = threading.Lock()  # two reader threads write the one file
        self._echo = echo

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> int:
        # The death signal is tied to the *thread* that forks: the supervisor loop spawns from the thread
        # that owns the child for its whole life, so the signal fires only when that owner is gone.
        self._open_log()  # before the spawn: a log file that cannot be opened leaves no child behind
        return self.adopt(warm.popen(self.argv, self.env), time.monotonic())

    def adopt(self, proc: subprocess.Popen[bytes], started: float) -> int:
        """Take over a child already spawned through the exec shim with our argv and env (a warm start, see
        wrapper.warm), started at `started` (monotonic): read its output and reap it as if we had started it."""
        self._open_log()
        self._proc = proc
        self.started, self.last_output = started, time.monotonic()
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self._proc.stdout,), name="llama-stdout", daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stderr,), name="llama-stderr", daemon=True),
            threading.Thread(target=self._emit, name="llama-log", daemon=True),
            threading.Thread(target=self._reap, name="llama-wait", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self._proc.pid

    def _open_log(self) -> None:
        if self._log_path is not None and self._log_file is None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self._log_path.open("w", encoding="utf-8", buffering=1)

    def _read(self, stream: IO[bytes]) -> None:
        # Raw reads, not readline: llama.cpp prints load progress as dots without a newline, and any byte
        # is progress. A line longer than max_line is cut into pieces so memory stays bounded.
        fd = stream.fileno()
        pending = b""
        with stream:
            while chunk := os.read(fd, 65536):
                self.last_output = time.monotonic()  # progress: resets the load timeout
                pending += chunk
                *lines, pending = pending.split(b"\n")
                while len(pending) > self._max_line:
                    lines.append(pending[: self._max_line])
                    pending = pending[self._max_line :]
                for raw in lines:
                    self._line(raw)
            if pending:
                self._line(pending)

    def _line(self, raw: bytes) -> None:
        line = self._redactor.redact(raw[: self._max_line].decode("utf-8", "replace").rstrip("\r"))
        if not line.strip():
            return
        self.tail.append(line)
        if self._log_file is not None:
            with self._log_lock:
                if not self._log_file.closed:  # a reader outliving close() (a grandchild holds the pipe)
                    self._log_file.write(line + "\n")
        if not self._echo:
            return
        parts = line.split(" ", 2)
        level = _LEVELS.get(parts[1], logging.INFO) if len(parts) > 2 else logging.INFO
        try:
            self._lines.put_nowait((level, line))
        except queue.Full:
            # Never block the child on our own logging: drop, count, and say so once drained.
            self.dropped += 1

    def _emit(self) -> None:
        reported = 0
        while (item := self._lines.get()) is not None:
            child_log.log(*item)
            if self.dropped != reported and self._lines.empty():
                log.warning("llama-server logged faster than the log sink: %d lines dropped", self.dropped - reported)
                reported = self.dropped

    def _reap(self) -> None:
        assert self._proc is not None
        before = oom_kills()
        self._proc.wait()
        after = oom_kills()
        if self._proc.returncode == -signal.SIGKILL and before is not None and after is not None and after > before:
            # The OOM killer leaves no line in the child's stderr; this one is the evidence for the classifier
            # (a SIGKILL alone could be anyone's `kill -9`, which a restart does fix).
            self.tail.append(f"wrapper: llama-server was {OOM_KILLED} (cgroup oom_kill {before} -> {after})")
        self._wake()

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit code once the child has exited, or None when it still runs after `timeout` seconds."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, sig: signal.Signals) -> bool:
        """Signal the child's whole process group; False when it is already gone."""
        with self._signal_lock:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                return False
            return True

    def stopped(self) -> bool:
        """True when the kernel says the child is stopped (SIGSTOP/SIGTSTP, or traced)."""
        if self._proc is None:
            return False
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] in ("T", "t")

    def cpu_seconds(self) -> float | None:
        """CPU time the child has used (user + system, from /proc), or None when it cannot be read."""
        if self._proc is None:
            return None
        try:
            fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        # utime and stime are the 12th and 13th fields after the command name, in clock ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def drain(self, timeout: float = 2.0) -> None:
        """After exit: wait until the readers have taken the last output, so `tail` holds the exit's cause."""
        for thread in self._threads[:2]:
            thread.join(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """After exit: let the readers drain the pipes, then stop the log emitter."""
        for thread in self._threads[:2]:
            thread.join(timeout)
        # When the emitter is wedged on a blocked log sink the put times out; it is a daemon thread.
        with contextlib.suppress(queue.Full):
            self._lines.put(None, timeout=timeout)
        for thread in self._threads[2:]:
            thread.join(timeout)
        if self._log_file is not None:
            with self._log_lock:
                self._log_file.close()


def oom_kills(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """How many processes the kernel OOM killer has killed in our memory cgroup (the child shares it), or
    None when no counter can be read. cgroup v2: memory.events; v1: memory.oom_control (kernel 4.13+)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates = [root / path.lstrip("/") / "memory.events"]
        elif "memory" in controllers.split(","):
            candidates = [root / "memory" / path.lstrip("/") / "memory.oom_control"]
        else:
            continue
        for file in candidates:
            with contextlib.suppress(OSError, ValueError):
                for entry in file.read_text().splitlines():
                    key, _, value = entry.partition(" ")
                    if key == "oom_kill":
                        return int(value)
    return None
