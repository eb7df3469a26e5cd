"""The supervisor: one owner of the llama-server child and of its state.

    stopped -> starting -> ready -> (restarting -> starting -> ready)* -> stopping -> stopped
                    \\-----------------------------> failed (not retryable, or a crash loop)

Everything happens on the thread that calls `run()`: signal handlers only record the signal and wake
the loop (gunicorn's arbiter does the same), the reader/probe/waiter threads only wake it. Every
transition is logged once and handed to the listeners on a dispatcher thread, so a slow listener (a
NATS publish, a self-check) can never delay a stop or a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from wrapper import warm
from wrapper.errors import ServerFailed
from wrapper.logs import Redactor
from wrapper.profiles.schema import SuperviseSpec
from wrapper.supervisor import policy
from wrapper.supervisor.classify import Failure, classify, describe_exit
from wrapper.supervisor.process import Child
from wrapper.supervisor.readiness import Prober

log = logging.getLogger("wrapper.supervisor")

State = Literal["stopped", "starting", "ready", "restarting", "stopping", "failed"]
STATES: tuple[State, ...] = ("stopped", "starting", "ready", "restarting", "stopping", "failed")


@dataclass(frozen=True)
class Transition:
    """One change of state, as every listener (status, events, self-check) receives it.

    `exit_code` / `exit_signal` describe how the child ended, on `restarting`, `failed` and `stopped`
    (a negative Popen returncode becomes the signal number; exit_code stays None then).
    """

    state: State
    previous: State
    pid: int | None
    restarts: int
    url: str
    ts: float
    reason: str = ""
    kind: str | None = None  # the failure class (wrapper.supervisor.classify) on restarting/failed
    exit_code: int | None = None
    exit_signal: int | None = None
    exit: str | None = None  # in words: "exit 1", "killed by SIGKILL"
    delay_s: float | None = None  # restarting: the back-off before the next start
    load_s: float | None = None  # ready: seconds from spawn to ready
    forced: bool | None = None  # stopped: a second signal (or the grace running out) needed SIGKILL
    lines: tuple[str, ...] = ()  # failed: the child's last relevant log lines


Listener = Callable[[Transition], None]


@dataclass(frozen=True)
class ExitStatus:
    code: int | None = None
    signal: int | None = None
    words: str | None = None

    @classmethod
    def of(cls, returncode: int | None) -> ExitStatus:
        """Popen's returncode: negative is the signal that ended the child."""
        if returncode is None:
            return cls()
        if returncode < 0:
            return cls(signal=-returncode, words=describe_exit(returncode))
        return cls(code=returncode, words=describe_exit(returncode))
# SIGHUP too: a closed terminal or a process manager that uses it means "stop", and Python would otherwise
# die at once and leave the stop to the parent-death signal (SIGKILL, no grace for llama-server).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        spec: SuperviseSpec,
        url: str,
        *,
        listeners: Iterable[Listener] = (),
        ready_poll_s: float = 0.05,
        rand: Callable[[], float] = random.random,
        api_key: str | None = None,
        before_stop: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        redactor: Redactor | None = None,
        after_spawn: Callable[[], None] | None = None,
        early: warm.Early | None = None,
    ) -> None:
        """`after_spawn`: runs once on the loop thread right after the first spawn, for work a start need not
        wait for (the status server, the event sink); an exception from it stops the child and propagates.
        `early`: a llama-server already running with exactly this argv and env (a warm start): the first spawn
        adopts it instead of starting another; the caller checked that it matches."""
        self.argv, self.env, self.spec, self.url = list(argv), dict(env), spec, url
        self._early = early
        self._after_spawn = after_spawn
        self._redactor = redactor  # handed to each Child: the child's output is redacted like our own logs
        self.listeners = list(listeners)
        self.ready_poll_s = ready_poll_s
        self._rand = rand
        # The loop's notion of now, and the clock of Child.started/last_output: a test swaps both for a
        # fake clock to run backoff and crash-loop windows of minutes in milliseconds.
        self._clock = clock
        self.state: State = "stopped"
        self.child: Child | None = None
        self.spawns = 0
        self.failures: list[float] = []  # monotonic times, for the crash-loop window
        self.streak = 0
        self.last_failure: Failure | None = None
        self._signals: list[int] = []
        self._stop_reasons: list[str] = []  # stops asked for by the wrapper itself (e.g. a failed self-check)
        # Runs on the loop thread before the one SIGTERM: the wrapper's own requests (self-check) are cancelled
        # first, so llama-server drains only its clients' requests within the grace.
        self._before_stop = before_stop
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        # llama-server protects /slots with its API key; any one of its keys will do.
        self._prober = Prober(url, self.wake, {"Authorization": f"Bearer {api_key}"} if api_key else None)
        self._live_path = "/slots"  # falls back to /health where the server has no usable /slots
        self._probe_cpu: float | None = None  # the child's CPU seconds at the last liveness probe
        self._events: queue.Queue[Transition | None] = queue.Queue()
        self._dispatcher = threading.Thread(target=self._dispatch, name="supervisor-events", daemon=True)
        self._next_probe = 0.0
        self._live_failures = 0
        self._ready_at = 0.0
        self._restart_at = 0.0
        self._kill_at = 0.0
        self._killed_for: tuple[str, str] | None = None  # (kind, reason) when we killed it on purpose
        self._forced = False
        self._signalled = False  # a stop signal arrived (not only a stop() call)
        self._sigkilled = False  # the stop needed SIGKILL (grace ran out, or a second signal)
        self._closed = False

    @property
    def restarts(self) -> int:
        return max(0, self.spawns - 1)

    @property
    def signalled(self) -> bool:
        """A stop signal arrived (SIGTERM/SIGINT), as opposed to a stop the wrapper asked for itself."""
        return self._signalled

    def wake(self) -> None:
        if self._closed:
            return
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"!")

    def request_stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        """Signal-handler safe: records and wakes; the loop acts."""
        self._signals.append(signum)
        self._signalled = True
        self.wake()

    def stop(self, reason: str) -> None:
        """Ask for a clean stop from any thread (the same path as SIGTERM, with our reason in the log)."""
        self._stop_reasons.append(reason)
        self.wake()

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped (0; 130 when a second signal forced it) or failed (raises ServerFailed)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                previous[sig] = signal.signal(sig, self.request_stop)
        self._dispatcher.start()
        try:
            self._spawn()
            if self._after_spawn is not None:
                self._after_spawn()
            return self._loop()
        finally:
            signalled = self._signalled
            self._cleanup()
            for sig, handler in previous.items():
                # After a signalled stop the process is on its way out (status server, event drain): a
                # repeated SIGTERM (timeout(1) sends two) used to hit the restored default action and end
                # a clean stop as "killed by SIGTERM" (exit 143). Ctrl-C keeps its meaning.
                signal.signal(sig, signal.SIG_IGN if signalled and sig != signal.SIGINT else handler)

    def _loop(self) -> int:
        while True:
            self._sleep(self._timeout())
            now = self._clock()
            self._take_signals(now)
            if self.state == "stopping":
                if self.child is None or not self.child.running():
                    return self._finish_stop()
                if now >= self._kill_at:
                    log.warning("llama-server ignored SIGTERM for %gs: sending SIGKILL", self.spec.stop_grace_s)
                    self._sigkilled = True
                    self.child.signal_group(signal.SIGKILL)
                    self._kill_at = now + 3600
                continue
            if self.child is not None and self.state in ("starting", "ready") and not self.child.running():
                self._on_exit(now)
            elif self.state == "restarting" and now >= self._restart_at:
                self._spawn()
            elif self.state == "starting":
                self._check_loading(now)
            elif self.state == "ready":
                self._check_liveness(now)

    def _timeout(self) -> float:
        now = self._clock()
        if self.state == "restarting":
            return max(0.0, self._restart_at - now)
        if self.state == "ready":
            return max(0.0, min(self._next_probe - now, 5.0))
        return self.ready_poll_s

    def _sleep(self, timeout: float) -> None:
        select.select([self._rfd], [], [], timeout)  # PEP 475: retried after a signal handler ran
        with contextlib.suppress(BlockingIOError):
            while os.read(self._rfd, 4096):
                pass

    # ---- stopping -------------------------------------------------------------------------------------

    def _take_signals(self, now: float) -> None:
        while self._stop_reasons:
            self._begin_stop(now, self._stop_reasons.pop(0))
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if self.state != "stopping":
                self._begin_stop(now, f"{name} received")
            elif signum == signal.SIGINT and not self._forced:
                # A second Ctrl-C means "now": do not wait out the grace period. A repeated SIGTERM does not:
                # timeout(1) and some process managers send it twice, and that is no user asking for force.
                self._forced = self._sigkilled = True
                log.warning("%s again: killing llama-server now", name)
                if self.child is not None:
                    self.child.signal_group(signal.SIGKILL)
            else:
                log.info("%s received while stopping: still waiting for llama-server (Ctrl-C twice forces)", name)

    def _begin_stop(self, now: float, reason: str) -> None:
        if self.state == "stopping":
            return
        self._transition("stopping", reason=reason)
        if self._before_stop is not None:
            try:
                self._before_stop()
            except Exception:
                log.exception("before-stop hook failed (stopping anyway)")
        self._kill_at = now + self.spec.stop_grace_s
        if self.child is not None and self.child.signal_group(signal.SIGTERM):
            log.info("sent SIGTERM to llama-server; waiting up to %gs", self.spec.stop_grace_s)

    def _finish_stop(self) -> int:
        status = ExitStatus()
        if self.child is not None:
            status = ExitStatus.of(self.child.returncode)
            self.child.close()
        self._transition("stopped", forced=self._sigkilled, status=status)
        return 130 if self._forced else 0

    # ---- starting and running -------------------------------------------------------------------------

    def _spawn(self) -> None:
        self.spawns += 1
        self._killed_for = None
        self._live_failures = 0
        self._probe_cpu = None
        self._next_probe = 0.0
        self.child = Child(self.argv, self.env, self.wake, redactor=self._redactor)
        early, self._early = self._early, None
        try:
            if early is not None and early.alive():
                early.adopted = True
                self.child.adopt(early.proc, early.started)
            else:
                if early is not None:
                    early.discard()  # it died since the match (its port may be what killed it): start ours
                self.child.start()
        except OSError as exc:
            self.child = None
            failure = Failure("spawn_error", False, f"could not start llama-server: {exc}")
            self._give_up(failure, "not retryable")
        self._transition("starting")

    def _check_loading(self, now: float) -> None:
        assert self.child is not None
        if self._killed_for is not None:
            return  # waiting for the kill to be reaped
        result = self._prober.take()
        if result is not None and result.tag == self.spawns and result.ready:
            self._ready_at = now
            self._next_probe = now + self.spec.liveness_interval_s
            self._transition("ready", load_s=round(now - self.child.started, 3))
            return
        quiet = now - self.child.last_output
        if quiet > self.spec.load_timeout_s:
            self._kill(
                "load_stalled",
                f"not ready and no output for {quiet:.1f}s (supervise.load_timeout_s={self.spec.load_timeout_s:g})",
            )
            return
        if now >= self._next_probe and self._prober.request(min(1.0, self.spec.liveness_timeout_s), self.spawns):
            self._next_probe = now + self.ready_poll_s

    def _check_liveness(self, now: float) -> None:
        assert self.child is not None
        if self._killed_for is not None:
            return
        result = self._prober.take()
        if result is not None and result.tag == self.spawns and self._live_path == "/slots" and (
            result.status in (401, 403, 404, 501)
        ):
            # --no-slots, or a key we could not read: the inference loop cannot be asked, /health can.
            log.info("llama-server's /slots answered HTTP %s: liveness probes use /health (they cannot see a "
                     "hung inference loop)", result.status)
            self._live_path = "/health"
            result = None
            self._next_probe = now
        if result is not None and result.tag == self.spawns:
            busy = self._cpu_advanced()
            if result.ready:
                if self._live_failures:
                    log.info("llama-server answers again after %d failed probes", self._live_failures)
                self._live_failures = 0
            elif busy and self._live_path == "/slots" and result.status is None and not self.child.stopped():
                log.info("liveness: /slots did not answer within %gs but llama-server is using CPU: busy "
                         "(a long prompt?), not hung", self.spec.liveness_timeout_s)
            else:
                self._live_failures += 1
                why = result.error or f"HTTP {result.status}"
                if self.child.stopped():
                    why += "; the process is stopped (SIGSTOP?)"
                log.warning("liveness probe failed (%d/%d): %s", self._live_failures, self.spec.liveness_failures, why)
                if self._live_failures >= self.spec.liveness_failures:
                    self._kill("hung", f"{self._live_failures} liveness probes failed in a row, last: {why}")
                    return
        if now >= self._next_probe and self._prober.request(self.spec.liveness_timeout_s, self.spawns,
                                                            self._live_path):
            self._next_probe = now + self.spec.liveness_interval_s

    def _cpu_advanced(self) -> bool:
        """Whether the child used CPU since the previous liveness probe. A /slots probe waits for the
        inference loop's next step, and on a slow CPU one step of a long prompt can outlast the timeout:
        a child that keeps using CPU is working, not stuck (a deadlocked or stopped one uses none)."""
        assert self.child is not None
        cpu, previous = self.child.cpu_seconds(), self._probe_cpu
        self._probe_cpu = cpu
        return cpu is not None and previous is not None and cpu - previous > 0.1

    def _kill(self, kind: str, reason: str) -> None:
        # SIGKILL, not SIGTERM: a hung or stopped process would never act on SIGTERM. The exit is then
        # handled like any other, with this reason instead of a guess from the exit status.
        assert self.child is not None
        log.error("llama-server %s: %s; killing it", kind.replace("_", " "), reason)
        self._killed_for = (kind, reason)
        self.child.signal_group(signal.SIGKILL)

    def _on_exit(self, now: float) -> None:
        child = self.child
        assert child is not None
        child.close()
        tail = list(child.tail)
        if self._killed_for is not None:
            kind, reason = self._killed_for
            failure = Failure(kind, True, reason)
        else:
            failure = classify(child.returncode, tail)
        self.last_failure = failure
        was_ready = self.state == "ready"
        log.warning("llama-server %s: %s", "failed after ready" if was_ready else "failed to start", failure.summary)
        for line in failure.lines:
            log.warning("  | %s", line)
        self.failures.append(now)
        self.streak = policy.streak_after(self.streak, now - child.started, self.spec)
        decision = policy.decide(
            retryable=failure.retryable,
            failures=self.failures,
            now=now,
            streak=self.streak,
            spec=self.spec,
            rand=self._rand,
        )
        if not decision.restart:
            self._give_up(failure, decision.reason)
        self._restart_at = now + decision.delay_s
        self._transition(
            "restarting",
            reason=failure.summary,
            kind=failure.kind,
            delay_s=round(decision.delay_s, 3),
            status=ExitStatus.of(child.returncode),
        )

    def _give_up(self, failure: Failure, why: str) -> None:
        returncode = self.child.returncode if self.child is not None else None
        self._transition("failed", reason=failure.summary, kind=failure.kind, lines=tuple(failure.lines),
                         status=ExitStatus.of(returncode))
        message = f"llama-server {failure.summary.removeprefix('llama-server ')}; {why}"
        if failure.lines:
            message += "".join(f"\n  | {line}" for line in failure.lines)
        raise ServerFailed(message, hint=failure.hint)

    # ---- transitions and listeners --------------------------------------------------------------------

    def _transition(
        self, state: State, *, reason: str = "", kind: str | None = None, status: ExitStatus | None = None,
        delay_s: float | None = None, load_s: float | None = None, forced: bool | None = None,
        lines: tuple[str, ...] = (),
    ) -> None:
        status = status or ExitStatus()
        exit_code, exit_signal, exit = status.code, status.signal, status.words
        previous, self.state = self.state, state
        t = Transition(state=state, previous=previous, pid=self.child.pid if self.child is not None else None,
                       restarts=self.restarts, url=self.url, ts=time.time(), reason=reason, kind=kind,
                       exit_code=exit_code, exit_signal=exit_signal, exit=exit, delay_s=delay_s, load_s=load_s,
                       forced=forced, lines=lines)
        shown = {"reason": reason, "kind": kind, "delay_s": delay_s, "exit": exit, "load_s": load_s,
                 "forced": forced}
        detail = ", ".join(f"{k}={v}" for k, v in shown.items() if v not in (None, ""))
        level = logging.ERROR if state == "failed" else logging.INFO
        log.log(level, "llama-server %s -> %s (pid %s, restarts %d%s)", previous, state, t.pid, self.restarts,
                f", {detail}" if detail else "")
        self._events.put(t)

    def _dispatch(self) -> None:
        while (t := self._events.get()) is not None:
            for listener in self.listeners:
                try:
                    listener(t)
                except Exception:
                    log.exception("listener %r failed on %s (supervision continues)", listener, t.state)

    def _cleanup(self) -> None:
        # Whatever ended the loop (a stop, a crash loop, a bug), the child must not outlive it.
        child = self.child
        if child is not None and child.running():
            child.signal_group(signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while child.running() and time.monotonic() < deadline:
                time.sleep(0.02)
            child.close()
        self._closed = True
        self._prober.close()
        self._events.put(None)
        if self._dispatcher.is_alive():
            self._dispatcher.join(timeout=5.0)
        if not self._prober.alive:
            # Only once nothing can call wake(): a write to a closed, reused descriptor would corrupt it.
            for fd in (self._rfd, self._wfd):
                os.close(fd)

