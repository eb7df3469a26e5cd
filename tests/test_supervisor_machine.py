"""The supervisor's state machine on a fake clock: restart backoff, the crash-loop window, the streak reset
after a stable run, and giving up, over minutes of simulated time that run in milliseconds.

The real `Supervisor` loop runs; only its two edges are stand-ins: the llama-server child (a script of
lives: how long each run lasts, when it gets ready, how it exits) and the health prober (it answers what
the scripted child would). What needs a real process (process groups, signals, reaping, parent death)
is tested in test_supervisor.py and test_supervisor_faults.py.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from wrapper.errors import ServerFailed
from wrapper.profiles.schema import SuperviseSpec
from wrapper.supervisor import machine
from wrapper.supervisor.readiness import ProbeResult

SPEC = SuperviseSpec(max_restarts=3, restart_window_s=60, backoff_initial_s=1, backoff_max_s=8, stable_after_s=30)
TICK = 0.01  # fake seconds per clock read; the measured delays are exact to a few ticks


@dataclass(frozen=True)
class Life:
    """One run of the fake llama-server: it exits `exits_after_s` after its start (None: serves until it
    is signalled), answers /health with 200 from `ready_after_s` on (None: never), and exits with
    `returncode` after printing `tail`."""

    exits_after_s: float | None
    ready_after_s: float | None = 1.0
    returncode: int = -int(signal.SIGSEGV)
    tail: tuple[str, ...] = ()


class World:
    """Fake time and the scripted children. Every clock read advances time one tick and wakes the loop,
    so the supervisor never waits for real: a 60 s backoff is 6000 loop turns."""

    def __init__(self, lives: Sequence[Life], stop_when: Callable[[World], bool] | None = None) -> None:
        self.now = 1000.0
        self.lives = list(lives)
        self.children: list[FakeChild] = []
        self.transitions: list[machine.Transition] = []
        self.states: list[str] = []
        # By default the run is stopped (SIGTERM) once the last scripted child is ready.
        self.stop_when = stop_when or (lambda w: not w.lives and w.state() == "ready")
        self.stop_sent = False
        self.supervisor: machine.Supervisor | None = None

    def clock(self) -> float:
        self.now += TICK
        if not self.stop_sent and self.stop_when(self):
            self.stop_sent = True
            self.sup.request_stop(signal.SIGTERM)
        self.sup.wake()
        return self.now

    @property
    def sup(self) -> machine.Supervisor:
        assert self.supervisor is not None
        return self.supervisor

    def state(self) -> str:
        """The machine's state as its own loop sees it (`states` arrive later, on the dispatcher thread)."""
        return self.sup.state

    def record(self, transition: machine.Transition) -> None:
        """The supervisor's listener: every transition, in order."""
        self.transitions.append(transition)
        self.states.append(transition.state)

    def gaps(self) -> list[float]:
        """Seconds from each child's exit to the start of the next one: the restart delays."""
        pairs = zip(self.children, self.children[1:], strict=False)
        return [later.started - earlier.exited_at() for earlier, later in pairs]


class FakeChild:
    """What the machine uses of `process.Child`, driven by one Life on the world's clock."""

    def __init__(self, world: World) -> None:
        assert world.lives, "the supervisor started more children than the test scripted"
        self.world = world
        self.life = world.lives.pop(0)
        self.tail = list(self.life.tail)
        self.signals: list[int] = []
        self.started = 0.0
        self._end: float | None = None
        self._code = self.life.returncode
        self.pid: int | None = None

    def start(self) -> int:
        self.started = self.world.now
        self._end = None if self.life.exits_after_s is None else self.started + self.life.exits_after_s
        self.pid = 40000 + len(self.world.children)
        self.world.children.append(self)
        return self.pid

    @property
    def last_output(self) -> float:
        return self.world.now  # it keeps logging: the load-stall timeout never fires here

    def exited_at(self) -> float:
        assert self._end is not None
        return self._end

    def running(self) -> bool:
        return self._end is None or self.world.now < self._end

    def ready(self) -> bool:
        after = self.life.ready_after_s
        return after is not None and self.running() and self.world.now >= self.started + after

    @property
    def returncode(self) -> int | None:
        return None if self.running() else self._code

    def signal_group(self, sig: signal.Signals) -> bool:
        if not self.running():
            return False
        self.signals.append(int(sig))
        self._end, self._code = self.world.now, -int(sig)
        return True

    def stopped(self) -> bool:
        return False

    def cpu_seconds(self) -> float | None:
        return None

    def close(self, timeout: float = 2.0) -> None:
        pass


class FakeProber:
    """Answers the one probe in flight with what the current child would say."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._pending: int | None = None
        self.alive = False

    def request(self, timeout_s: float, tag: int = 0, path: str = "/health") -> bool:
        self._pending = tag
        return True

    def take(self) -> ProbeResult | None:
        if self._pending is None:
            return None
        tag, self._pending = self._pending, None
        return ProbeResult(200 if self.world.children[-1].ready() else 503, "", 0.0, tag)

    def close(self) -> None:
        pass


def supervise(
    monkeypatch: pytest.MonkeyPatch,
    lives: Sequence[Life],
    spec: SuperviseSpec = SPEC,
    stop_when: Callable[[World], bool] | None = None,
    after_spawn: Callable[[World], None] | None = None,
) -> tuple[World, int | ServerFailed]:
    """Run a real Supervisor over the scripted lives; returns its exit code or the ServerFailed it raised."""
    world = World(lives, stop_when)
    monkeypatch.setattr(machine, "Child", lambda argv, env, wake, **_: FakeChild(world))
    monkeypatch.setattr(machine, "Prober", lambda url, wake, headers=None: FakeProber(world))
    # rand=1.0: no jitter, so each delay is exactly the policy's base delay.
    sup = machine.Supervisor(
        ["llama-server"], {}, spec, "http://127.0.0.1:9", listeners=[world.record], rand=lambda: 1.0, clock=world.clock,
        after_spawn=None if after_spawn is None else lambda: after_spawn(world),
    )
    world.supervisor = sup
    outcome: int | ServerFailed
    try:
        outcome = sup.run()
    except ServerFailed as exc:
        outcome = exc
    return world, outcome


def test_backoff_doubles_until_a_crash_loop_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    world, outcome = supervise(monkeypatch, [Life(0.5, ready_after_s=None)] * 4)
    assert isinstance(outcome, ServerFailed), outcome
    assert "crash loop: 4 failures in 60s (supervise.max_restarts=3)" in str(outcome)
    assert "SIGSEGV" in str(outcome)
    assert world.gaps() == pytest.approx([1.0, 2.0, 4.0], abs=5 * TICK)
    assert world.states == ["starting", "restarting"] * 3 + ["starting", "failed"]
    assert len(world.children) == 4 and world.sup.restarts == 3
    ended = [t for t in world.transitions if t.state in ("restarting", "failed")]
    assert [t.delay_s for t in ended] == [1.0, 2.0, 4.0, None]
    assert {(t.exit_code, t.exit_signal) for t in ended} == {(None, int(signal.SIGSEGV))}


@pytest.mark.parametrize(
    ("window_s", "children", "gives_up"),
    [
        # Failures 25 s apart plus backoff: with a 60 s window the 4th failure only sees 3 inside it.
        (60, 7, False),
        (120, 4, True),  # the same history inside a 120 s window: 4 failures, a crash loop
    ],
)
def test_failures_that_left_the_window_do_not_count(
    monkeypatch: pytest.MonkeyPatch, window_s: float, children: int, gives_up: bool
) -> None:
    spec = SPEC.model_copy(update={"restart_window_s": window_s})
    lives = [Life(25.0)] * 6 + [Life(None)]  # each run serves 25 s (< stable_after_s), then crashes
    world, outcome = supervise(monkeypatch, lives, spec)
    assert len(world.children) == children
    assert isinstance(outcome, ServerFailed) is gives_up, outcome
    assert world.gaps() == pytest.approx([1.0, 2.0, 4.0, 8.0, 8.0, 8.0][: children - 1], abs=5 * TICK)
    assert world.states[-1] == ("failed" if gives_up else "stopped")


def test_a_stable_run_resets_the_backoff_streak(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SPEC.model_copy(update={"max_restarts": 10})
    lives = [Life(5.0), Life(5.0), Life(40.0), Life(5.0), Life(None)]  # the third outlives stable_after_s=30
    world, outcome = supervise(monkeypatch, lives, spec)
    assert outcome == 0
    assert world.gaps() == pytest.approx([1.0, 2.0, 1.0, 2.0], abs=5 * TICK)
    assert world.sup.streak == 2
    assert world.states == ["starting", "ready", "restarting"] * 4 + ["starting", "ready", "stopping", "stopped"]


def test_a_fault_that_would_repeat_gives_up_without_restarting(monkeypatch: pytest.MonkeyPatch) -> None:
    bad_flag = Life(0.2, ready_after_s=None, returncode=1, tail=("error: invalid argument: --bogus",))
    world, outcome = supervise(monkeypatch, [bad_flag])
    assert isinstance(outcome, ServerFailed), outcome
    assert "not retryable" in str(outcome) and "--bogus" in str(outcome)
    assert world.states == ["starting", "failed"]
    assert (world.transitions[-1].exit_code, world.transitions[-1].kind) == (1, "bad_argument")
    assert len(world.children) == 1 and world.sup.restarts == 0


def test_stop_during_the_backoff_starts_no_other_child(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SPEC.model_copy(update={"backoff_initial_s": 20.0, "backoff_max_s": 20.0})
    world, outcome = supervise(
        monkeypatch, [Life(0.5, ready_after_s=None)], spec, stop_when=lambda w: w.state() == "restarting"
    )
    assert outcome == 0
    assert len(world.children) == 1
    assert world.states == ["starting", "restarting", "stopping", "stopped"]
    assert world.now - world.children[0].exited_at() < 1.0, "the stop must not wait out the 20 s backoff"


def test_stop_sends_one_sigterm_to_a_serving_child(monkeypatch: pytest.MonkeyPatch) -> None:
    world, outcome = supervise(monkeypatch, [Life(None)])
    assert outcome == 0
    assert world.children[0].signals == [int(signal.SIGTERM)]
    assert world.states == ["starting", "ready", "stopping", "stopped"]
    stopped = world.transitions[-1]
    assert (stopped.exit_signal, stopped.forced) == (int(signal.SIGTERM), False)


def test_after_spawn_runs_once_with_the_first_child_already_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: the status server and the event sink start beside the loading child, not before its exec."""
    seen: list[tuple[int, str]] = []

    def after(world: World) -> None:
        seen.append((len(world.children), world.state()))

    world, outcome = supervise(monkeypatch, [Life(0.5, ready_after_s=None), Life(None)], after_spawn=after)
    assert outcome == 0
    assert len(world.children) == 2  # a restart happened, and the hook did not run again for it
    assert seen == [(1, "starting")]


def test_a_failing_after_spawn_stops_the_child_and_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def after(world: World) -> None:
        raise OSError("status port taken")

    world = World([Life(None)])
    monkeypatch.setattr(machine, "Child", lambda argv, env, wake, **_: FakeChild(world))
    monkeypatch.setattr(machine, "Prober", lambda url, wake, headers=None: FakeProber(world))
    sup = machine.Supervisor(["llama-server"], {}, SPEC, "http://127.0.0.1:9", clock=world.clock,
                             after_spawn=lambda: after(world))
    world.supervisor = sup
    with pytest.raises(OSError, match="status port taken"):
        sup.run()
    assert world.children[0].signals == [int(signal.SIGKILL)]
    assert not world.children[0].running()
