"""The library's `run(launch) -> exit code`: supervisor, status server, self-check and events, wired once.

Everything here receives the one `Launch` (wrapper.launch.prepare): the supervisor runs its argv and env,
the status server shows it, the self-check measures its URL with its key and files the result under its
fingerprint, and every event carries its identity. Events go to a sink that never blocks serving.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wrapper import warm
from wrapper.errors import ConfigError, ServerFailed
from wrapper.events.sink import EventSink, NullSink
from wrapper.launch.prepare import Launch, chat_template_warning
from wrapper.logs import Redactor, secrets_of
from wrapper.supervisor import StatusState, Supervisor, Transition, check_port_free
from wrapper.supervisor.status import read_token

if TYPE_CHECKING:
    # Imported where they are used: everything before llama-server's exec delays its start (issue 16), and the
    # event models, the self-check and the step-down are needed only once it runs (or fails).
    from wrapper.events.payloads import EventContext, GpuReading, InstanceEvent, InstanceKind, NodeOffline, Scalar
    from wrapper.launch.rollback import Fallback
    from wrapper.launch.stepdown import StepDown
    from wrapper.measure import selfcheck
    from wrapper.supervisor.status_server import StatusServer

__all__ = ["NullSink", "SelfChecks", "event_context", "open_sink", "run", "selfcheck_target"]

log = logging.getLogger("wrapper.serve")

_INSTANCE_KINDS: dict[str, InstanceKind] = {"ready": "ready", "restarting": "restarted", "failed": "failed",
                                            "stopped": "stopped"}


def event_context(launch: Launch) -> EventContext:
    """Who this process is, for every event it sends."""
    from wrapper.events.payloads import EventContext, ModelRef
    from wrapper.plan import hardware

    s = launch.settings
    model = ModelRef(name=launch.model_file.name, sha256=launch.sha256,
                     size_bytes=launch.model.size if launch.model is not None else None)
    who = s.identity
    return EventContext(instance_id=who.instance_id, host=socket.gethostname(), profile=s.profile_name, model=model,
                        hardware=hardware.event_summary(launch.host), node_id=who.node_id,
                        advertise_url=who.advertise_url, service_name=who.service_name,
                        service_version=who.service_version)


def gpu_reader(launch: Launch) -> Callable[[], list[GpuReading]] | None:
    """The GPU status reader for the heartbeat; None on a host where NVML found no GPU for this instance."""
    if not launch.host.gpus:
        return None
    from wrapper.events import gpu

    visible = launch.settings.cuda_visible_devices
    return lambda: gpu.read(visible)


def open_sink(launch: Launch) -> EventSink:
    """The NATS publisher when NATS_URL is set (imported only then), else a sink that drops everything."""
    url = launch.settings.env.nats_url
    if not url:
        return NullSink()
    from wrapper.events.publisher import NatsAccess, Publisher

    publisher = Publisher(NatsAccess.from_env(launch.settings.env), context=event_context(launch))
    services = ["llama-server", f"profile:{launch.settings.profile_name}"]
    if launch.settings.env.service_name:
        services.append(f"service:{launch.settings.env.service_name}")
    publisher.start_heartbeat(launch.settings.env.heartbeat_s, services, gpus=gpu_reader(launch))
    return publisher


def selfcheck_target(launch: Launch) -> selfcheck.Target:
    """What the self-check measures for this launch: its URL and key, filed under its hash and fingerprint."""
    from wrapper.measure import selfcheck

    s = launch.settings
    return selfcheck.Target(url=launch.url, spec=s.profile.selfcheck, state_dir=s.env.state_path(),
                            api_key=launch.api_key, task=s.profile.task_type, parallel=s.server.parallel,
                            profile=s.profile_name, sha256=launch.sha256, fingerprint=launch.host.fingerprint,
                            prompt_words=launch.expected.prompt_words if launch.expected else None)


def instance_event(context: EventContext, t: Transition) -> InstanceEvent | None:
    """llama.instance.<kind>.v1 for a transition that has one (ready, restarting, failed, stopped)."""
    from wrapper.events.payloads import InstanceEvent

    kind = _INSTANCE_KINDS.get(t.state)
    if kind is None:
        return None
    shown: dict[str, Scalar] = {"kind": t.kind, "delay_s": t.delay_s, "load_s": t.load_s, "forced": t.forced,
                                "exit": t.exit, "previous": t.previous}
    details = {k: v for k, v in shown.items() if v is not None}
    # The advertised URL, not the supervisor's loopback one: events are read by other nodes.
    return context.make(InstanceEvent, kind=kind, url=context.advertise_url or t.url, pid=t.pid, exit_code=t.exit_code,
                        exit_signal=t.exit_signal, restarts=t.restarts, reason=t.reason or None, details=details)


class SelfChecks:
    """After every "ready": one self-check in the background. A stop cancels it first (its requests would
    otherwise hold llama-server's drain for the whole grace), and a cancelled check is no verdict."""

    def __init__(self, launch: Launch, status: StatusState, sink: EventSink, context: EventContext | None) -> None:
        self.launch, self.status, self.sink, self.context = launch, status, sink, context
        self.failed: selfcheck.SelfCheckResult | None = None
        self.rollback: str | None = None  # why the tuned config was stopped, when it was (tuning.fallback)
        self.fallback: Fallback | None = None  # ... and what starts in its place
        self.can_roll_back = False  # run() has a fallback launch for this one (never for a fallback itself)
        self.supervisor: Supervisor | None = None
        self.pid: int | None = None  # llama-server's, from the last "ready" (its memory goes in the receipt)
        self._lock = threading.Lock()
        self._runs: list[tuple[selfcheck.Run, threading.Thread]] = []

    def on_transition(self, t: Transition) -> None:
        from wrapper.measure import selfcheck

        if t.state != "ready" or not self.launch.settings.profile.selfcheck.enabled:
            return
        self.pid = t.pid
        handle = selfcheck.Run()
        thread = threading.Thread(target=self._run, args=(handle,), name="wrapper-selfcheck", daemon=True)
        with self._lock:
            self._runs.append((handle, thread))
        thread.start()

    def cancel(self, wait_s: float = 1.0) -> None:
        """Stop every check in flight, give each a moment to close its connections, and wait (briefly) until
        llama-server has dropped their slots: a SIGTERM that lands while it is still cancelling them can leave
        it waiting on a task that never answers, for the whole grace (seen on this machine under load)."""
        with self._lock:
            runs, self._runs = list(self._runs), []
        active = [thread for _, thread in runs if thread.is_alive()]
        for handle, _ in runs:
            handle.cancel()
        for thread in active:
            thread.join(wait_s)
        if active:
            _wait_slots_idle(self.launch, wait_s)

    def _run(self, handle: selfcheck.Run) -> None:
        from wrapper.events.payloads import SelfCheck
        from wrapper.launch import rollback
        from wrapper.measure import selfcheck

        expected = self.launch.expected
        try:
            result = selfcheck.run(selfcheck_target(self.launch), expected.tok_s if expected else None, handle=handle,
                                   expected_source=expected.source if expected else None)
        except selfcheck.Cancelled:
            log.info("selfcheck: cancelled (llama-server is stopping); no verdict")
            return
        except Exception as exc:
            if handle.cancelled:
                log.info("selfcheck: cancelled (llama-server is stopping); no verdict")
            else:
                log.warning("selfcheck: could not run: %s", exc)
            return
        if handle.cancelled:
            log.info("selfcheck: finished as llama-server was stopping; result not reported")
            return
        state, tuned = self.launch.settings.env.state_path(), self.launch.tuned
        why = self._rollback_reason(result)
        fallback = None
        if why is not None and tuned is not None:
            try:
                rollback.record(state, tuned.run_id, why)  # first: the fallback must never be this run again
                fallback = rollback.fallback_for(state, tuned)
            except Exception as exc:  # a full or read-only state dir, a damaged store: still stop the slow config
                log.warning("auto-tune: could not record the rollback under %s: %s", state, exc)
                fallback = rollback.Fallback(None, f"the tuning state could not be read ({exc})")
            result = result.model_copy(update={
                "action": f"rolled back to {fallback.target} (tuning.fallback): {fallback.why}",
                "exit_requested": False})
        elif tuned is not None and self._passed_tuned(result):
            try:
                rollback.record_good(state, tuned, f"{result.throughput_tps:.1f} {result.unit}")
            except Exception as exc:
                log.warning("auto-tune: could not remember that %s passed here: %s", tuned.run_id, exc)
        self.status.selfcheck = result.model_dump(mode="json")
        self._receipt(result)
        if self.context is not None:
            self.sink.emit(SelfCheck.of(self.context, result))
        if why is not None and fallback is not None and self.supervisor is not None:
            self.rollback, self.fallback = why, fallback
            log.error("auto-tune: %s; stopping it and starting %s (tuning.fallback): %s", why, fallback.target,
                      fallback.why)
            self.supervisor.stop("tuned config rolled back (tuning.fallback)")
            return
        if result.exit_requested and self.supervisor is not None:
            self.failed = result
            log.error("selfcheck failed (%s) and selfcheck.on_fail is exit: stopping", result.reason)
            self.supervisor.stop("selfcheck failed (selfcheck.on_fail: exit)")

    def _rollback_reason(self, result: selfcheck.SelfCheckResult) -> str | None:
        """Why this tuned start must be rolled back, or None: it measured clearly below the figure
        bench-profile recorded (its whole 95% interval under the expectation's lower bound)."""
        from wrapper.measure import selfcheck

        tuned, expected = self.launch.tuned, self.launch.expected
        if tuned is None or expected is None or expected.low is None or result.expected_source != expected.source:
            return None  # untuned, or the self-check could not repeat the tuned cell's load
        if not self.can_roll_back or not self.launch.settings.profile.tuning.fallback:
            return None  # tuning.fallback: false, or this run already fell back (no second rollback)
        if result.windows == 0 or not selfcheck.clearly_below(result, expected.low):
            return None  # not below, or only a partial figure (no window finished): too unsure to act on
        high = result.ci_high if result.ci_high is not None else result.throughput_tps
        return (f"{tuned.run_id} measured {result.throughput_tps:.1f} tok/s (at most {high:.1f} at 95%), below "
                f"{expected.low:.1f}, the lower bound of the {expected.tok_s:.1f} tok/s {expected.source} recorded")

    def _passed_tuned(self, result: selfcheck.SelfCheckResult) -> bool:
        """The tuned config passed here: the self-check repeated its cell's load, finished whole windows and
        did not land below what bench-profile recorded (a later rollback may fall back to it)."""
        expected = self.launch.expected
        return (expected is not None and result.expected_source == expected.source and result.verdict == "pass"
                and result.windows > 0 and not result.errors
                and (expected.low is None or result.throughput_tps >= expected.low))

    def _receipt(self, result: selfcheck.SelfCheckResult) -> None:
        """Measured decode speed beside the plan's ceiling for this host (calibrates later plans)."""
        from wrapper.plan import receipts

        measured = result.server_decode_tps or result.client_decode_tps
        if measured and result.verdict != "fail":
            receipts.record_measurement(self.launch.settings, self.launch.model_file, measured, kind="selfcheck",
                                        hw=self.launch.host, pid=self.pid)


def _wait_slots_idle(launch: Launch, within_s: float) -> None:
    """Until no slot of llama-server is processing (or within_s passed, or /slots cannot tell)."""
    import httpx

    headers = {"Authorization": f"Bearer {launch.api_key}"} if launch.api_key else {}
    deadline = time.monotonic() + within_s
    with httpx.Client(base_url=launch.url, headers=headers, timeout=0.5, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                slots = client.get("/slots").json()
            except (httpx.HTTPError, ValueError):
                return
            if not isinstance(slots, list) or not any(isinstance(x, dict) and x.get("is_processing") for x in slots):
                return
            time.sleep(0.02)


def _show_launch(status: StatusState, launch: Launch, why: str | None = None) -> None:
    """Point the status at the launch now running (a rollback or a step-down), keeping the self-check that
    explains the switch; `why` goes first among its decisions."""
    fresh = StatusState.from_launch(launch)
    status.argv, status.args, status.env = fresh.argv, fresh.args, fresh.env
    status.binary_version, status.url = fresh.binary_version, fresh.url
    status.decisions = [why, *fresh.decisions] if why else fresh.decisions


def _warn_chat_template(launch: Launch) -> None:
    warning = chat_template_warning(launch)
    if warning:
        log.warning("%s", warning)


def _step_down(launch: Launch, kind: str, lines: tuple[str, ...]) -> StepDown | None:
    """Never a crash loop on out-of-memory: one smaller launch (wrapper.launch.stepdown), or None."""
    from wrapper.launch import stepdown

    if not stepdown.is_oom(kind):
        return None
    try:
        smaller = stepdown.replan(launch, kind, lines)
    except Exception as exc:  # the replan reads the model and the host again; any failure keeps the first error
        log.error("step-down: could not replan: %s", exc)
        return None
    if smaller is not None:
        log.warning("%s; retrying once with: %s", smaller.summary, " ".join(smaller.launch.command.redacted_argv()))
    return smaller


def _show_step_down(status: StatusState, step: StepDown) -> None:
    _show_launch(status, step.launch)
    status.extra["step_down"] = {"reason": step.summary, "gave_up": step.gave_up}


def _offline(context: EventContext, code: int | None, checks: SelfChecks, started: float) -> NodeOffline:
    """mesh.node.offline.v1 on the way out: "stopped" for a clean stop, else why serving ended."""
    from wrapper.events.payloads import NodeOffline

    if checks.failed is not None:
        reason, exit_code = f"selfcheck failed: {checks.failed.reason}", 4
    elif code is None:
        reason, exit_code = "llama-server could not be kept up", 4
    else:
        reason, exit_code = ("stopped" if code == 0 else "forced stop"), code
    return context.make(NodeOffline, node_id=context.node_id or context.instance_id, reason=reason,
                        exit_code=exit_code, uptime_s=round(time.monotonic() - started, 3))


def _adoptable(launch: Launch, early: warm.Early | None) -> warm.Early | None:
    """The early llama-server (a warm start) when it runs exactly this launch's command on the same files;
    else it is stopped (and waited for: its port is free when this returns)."""
    if early is None:
        return None
    why = (early.difference(launch.command.argv, launch.child_env()) if early.alive()
           else "it exited before the profile was read")
    if why is None and (changed := early.changed_file()) is not None:
        why = f"{changed} changed while this start was prepared"  # a re-download in place, a rotated key file
    if why is None:
        log.info("warm start: llama-server was spawned %.2f s ago from the last start's command, which this start "
                 "derives too", time.monotonic() - early.started)
        warm.touch()
        return early
    log.info("warm start: not used (%s); starting llama-server with this start's command", why)
    early.discard()
    return None


def _remember_warm(launch: Launch) -> None:
    """A command that reached "ready" is what the next start with the same inputs spawns first (wrapper.warm):
    only on a host without GPUs, for an argv without a secret, and not when the placement plan chose part of
    it (the plan reads the memory free at each start, which an early child would already be using)."""
    if not warm.active():
        return
    from wrapper.launch.flags import redact_argv
    from wrapper.launch.preflight import runtime_dir
    from wrapper.settings import SECRET_ENV

    argv, s = launch.command.argv, launch.settings
    if "plan" in s.origins.values() or warm.gpu_host() or launch.host.gpus or redact_argv(argv) != argv:
        return
    shards = launch.model.shards if launch.model is not None else ()
    files: list[str | Path] = [s.registry_path, *shards, *(token for token in argv if os.path.isfile(token))]
    try:
        warm.remember(argv, launch.child_env(), set_env=launch.command.env,
                      drop=sorted(set(SECRET_ENV) | set(launch.command.dropped_env)), host=s.server.host,
                      port=s.server.port, files=files, runtime_dir=runtime_dir(s))
    except OSError as exc:
        log.debug("warm start: could not record this command: %s", exc)


def run(launch: Launch, *, sink: EventSink | None = None, fallback: Callable[[str | None], Launch] | None = None,
        redactor: Redactor | None = None, early: warm.Early | None = None) -> int:
    """Supervise llama-server for `launch` until stopped. Returns the exit code (0 clean stop, 130 forced) or
    raises ServerFailed (exit 4) when it cannot be kept up, PortInUse/ConfigError (exit 2) before it starts.

    fallback: builds the launch a rolled-back tuned start falls back to (tuning.fallback), given the stored run to
    apply (the last tuned config that passed its self-check here) or None (the profile's own config); the
    tuned llama-server is stopped and that one supervised in its place, under the same status server and sink.
    redactor: the process's one redactor (the CLI's), applied to llama-server's output and to /status.
    early: llama-server spawned before the profile was read (wrapper.warm): adopted when it runs exactly this
    launch's command, else stopped before this one starts."""
    redactor = redactor if redactor is not None else Redactor(secrets_of(launch.settings))
    s = launch.settings
    host, port = s.server.host, s.server.port
    if s.env.status_port and s.env.status_port == port:
        raise ConfigError(
            f"WRAPPER_STATUS_PORT={port} is also llama-server's port (llamacpp.port)",
            hint="give the status server another port, or 0 to disable it",
        )
    adopt = _adoptable(launch, early)
    if adopt is None:  # an adopted child holds the port itself
        check_port_free(host, port, profile=s.profile_name)
    token = read_token(s.env) if s.env.status_port else None  # a bad token file fails before anything starts
    if s.env.status_port:
        check_port_free(s.env.status_host, s.env.status_port, "WRAPPER_STATUS_PORT", s.profile_name)
    out: EventSink = NullSink()  # until after_spawn opens the real one
    context: EventContext | None = None
    status = StatusState.from_launch(launch)
    if adopt is not None:
        status.decisions = [*status.decisions, "warm start: llama-server was spawned from the last start's command "
                            "(same inputs) before the profile was read, and adopted once this start derived the same"]
    checks = SelfChecks(launch, status, out, None)
    checks.can_roll_back = fallback is not None
    server: StatusServer | None = None
    wired = False

    def publish_instance(t: Transition) -> None:
        event = instance_event(context, t) if context is not None else None
        if event is not None:
            out.emit(event)

    def open_events() -> None:
        nonlocal out, context
        out = sink if sink is not None else open_sink(launch)
        context = event_context(launch) if not isinstance(out, NullSink) else None
        checks.sink, checks.context = out, context

    def after_spawn() -> None:
        """What llama-server's load need not wait for (issue 16): the status server's HTTP stack, the event
        sink (NATS) and their imports, started once the child runs. Transitions before this ("starting") are
        not published; "ready" comes from the loop, after this returns."""
        nonlocal server, wired
        from wrapper.supervisor.status_server import StatusServer

        wired = True
        # Reading the GGUF header is no reason to delay the start either: warn beside the loading child.
        threading.Thread(target=_warn_chat_template, args=(launch,), name="template-check", daemon=True).start()
        if s.env.status_port:
            server = StatusServer(s.env.status_host, s.env.status_port, status, token=token, redactor=redactor).start()
        open_events()

    stepped = False
    remembered = adopt is not None  # an adopted child came from the record its command would write

    def remember(t: Transition) -> None:
        nonlocal remembered
        if t.state == "ready" and not remembered and not stepped:
            remembered = True
            _remember_warm(launch)

    started = time.monotonic()
    code: int | None = None
    try:
        while True:
            supervisor = Supervisor(launch.command.argv, launch.child_env(), s.profile.supervise, launch.url,
                                    listeners=[status, publish_instance, checks.on_transition, remember],
                                    api_key=launch.api_key, before_stop=checks.cancel, redactor=redactor,
                                    after_spawn=None if wired else after_spawn, early=adopt)
            adopt = None
            checks.supervisor = supervisor
            try:
                code = supervisor.run()
                if checks.rollback is None or checks.fallback is None or fallback is None or supervisor.signalled:
                    break
                checks.cancel(wait_s=0.5)
                warm.forget()  # the next start derives the fallback: record that one once it is ready
                remembered = False
                to = checks.fallback
                launch, fallback = fallback(to.run_id), None  # not rolled back in turn within this run
                _show_launch(status, launch, f"auto-tune: rolled back: {checks.rollback}; now serving {to.target}: "
                                             f"{to.why}")
                checks.launch, checks.rollback, checks.fallback, checks.can_roll_back = launch, None, None, False
            except ServerFailed:
                failure = supervisor.last_failure
                smaller = None if stepped or failure is None else _step_down(launch, failure.kind, failure.lines)
                if smaller is None:
                    raise
                stepped = True
                warm.forget()  # a step-down holds for this run only
                launch = smaller.launch
                checks.launch = launch
                _show_step_down(status, smaller)
                if context is not None:
                    from wrapper.events.payloads import InstanceEvent

                    out.emit(context.make(InstanceEvent, kind="restarted", url=context.advertise_url or launch.url,
                                           reason=smaller.summary,
                                           details={"kind": "step_down", "gave_up": "; ".join(smaller.gave_up)}))
    finally:
        checks.cancel(wait_s=0.5)
        if server is not None:
            server.stop()
        if context is None and (sink is not None or s.env.nats_url):
            # The events never opened (llama-server could not be spawned, or what follows the spawn failed): the
            # fleet still hears this node go offline, and a broken NATS setting does not hide the first error.
            try:
                open_events()
            except Exception as exc:
                log.warning("events: not sent: %s", exc)
        if context is not None:
            out.emit(_offline(context, code, checks, started))
        out.close(s.profile.supervise.stop_grace_s)
    if checks.failed is not None:
        raise ServerFailed(
            f"selfcheck failed: {checks.failed.reason} (selfcheck.on_fail is exit)",
            hint="see `wrapper selfcheck --url ...` for the figures, or set selfcheck.on_fail: warn to keep serving",
        )
    return code
