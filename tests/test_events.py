"""Events against a real nats-server: buffering while down, drops, JetStream, schemas, self-check end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest

from tests.conftest import tiny_profile, write_registry
from tests.loadgen_fixtures import Nats, server_counters
from tests.supervisor_fixtures import fake_binary
from wrapper import serve, settings
from wrapper.events import payloads as events
from wrapper.events import publisher
from wrapper.measure import selfcheck
from wrapper.supervisor import State, Transition

CTX: dict[str, Any] = {"instance_id": "test-1", "host": "h", "profile": "tiny",
                       "model": events.ModelRef(name="m.gguf", sha256="ab" * 32, size_bytes=10),
                       "hardware": events.HardwareSummary(arch="x86_64", cpu_count=2, capabilities=["cpu:x86_64"])}


def _cell(i: int) -> events.BenchmarkCell:
    return events.BenchmarkCell(**CTX, run_id="r1", index=i, config={"parallel": 2}, throughput_tps=10.0,
                                requests=4, errors=0, prompt_tokens=40, completion_tokens=32)


def collect(url: str, subject: str, action: Callable[[], Any], want: int, timeout: float = 10.0) -> list[Any]:
    """Subscribe, run action in a thread, return the decoded messages (stops at `want` or timeout)."""

    async def main() -> list[Any]:
        nc = await nats.connect(url)
        got: list[Any] = []
        enough = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            got.append((msg.subject, json.loads(msg.data)))
            if len(got) >= want:
                enough.set()

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        await asyncio.to_thread(action)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout)
        await nc.close()
        return got

    return asyncio.run(main())


def test_schemas_export_and_every_payload_validates(tmp_path: Path) -> None:
    written = events.write_schemas(tmp_path)
    names = {p.name for p in written}
    assert "llama.selfcheck.v1.json" in names and "mesh.node.announce.v1.json" in names
    assert "llama.instance.ready.v1.json" in names and "llama.benchmark.cell.v1.json" in names
    schema = json.loads((tmp_path / "llama.benchmark.cell.v1.json").read_text())
    jsonschema.validate(json.loads(_cell(0).model_dump_json()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(_cell(0).model_dump_json()), "schema_version": 2}, schema)


def test_committed_schemas_are_current() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "schemas"
    subjects = events.subjects()
    # Both ways: a subject without a committed schema, or a schema left over from a removed subject.
    assert sorted(subjects) == sorted(path.stem for path in docs.glob("*.json"))
    for subject, cls in subjects.items():
        committed = json.loads((docs / f"{subject}.json").read_text())
        assert committed == {**cls.model_json_schema(), "$id": subject}, f"re-export {subject}"


def test_nats_down_at_start_warns_once_then_delivers_when_it_comes_up(
        nats_factory: type[Nats], caplog: pytest.LogCaptureFixture) -> None:
    server = nats_factory()
    caplog.set_level(logging.INFO, "wrapper.events")
    pub = publisher.Publisher(server.url, context=CTX, connect_timeout_s=0.5)
    try:
        started = time.monotonic()
        for i in range(3):
            pub.publish(events.BenchmarkCell.SUBJECT, _cell(i))
        assert time.monotonic() - started < 0.05  # never blocks the caller
        time.sleep(2.5)  # several reconnect attempts
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
        got = collect(_start_and_url(server), "llama.>", lambda: None, want=3)
        assert [m["index"] for _, m in got] == [0, 1, 2]
        assert pub.jetstream  # -js server: benchmark results went through JetStream
    finally:
        pub.close(2)


def _start_and_url(server: Nats) -> str:
    server.start()
    return server.url


def test_nats_killed_mid_run_counts_drops_and_never_blocks(nats_factory: type[Nats]) -> None:
    server = nats_factory(jetstream=False).start()
    pub = publisher.Publisher(server.url, context=CTX, buffer_size=5, connect_timeout_s=0.5)
    try:
        got = collect(server.url, "llama.>", lambda: pub.publish(events.BenchmarkCell.SUBJECT, _cell(0)), want=1)
        assert len(got) == 1 and not pub.jetstream  # no JetStream: plain publish
        server.kill()
        time.sleep(1.0)  # the client notices the closed socket
        started = time.monotonic()
        for i in range(20):
            pub.publish(events.BenchmarkCell.SUBJECT, _cell(i))
        assert time.monotonic() - started < 0.1
        assert pub.dropped >= 15
    finally:
        pub.close(1)


def test_an_event_emitted_just_before_close_is_still_delivered(nats_factory: type[Nats]) -> None:
    """Review finding: a node that goes offline moments after it started (llama-server could not be spawned)
    emitted its offline event and closed at once; close() cancelled the connect still under way and nothing
    was sent. The connect now gets close()'s grace to deliver what is buffered."""
    server = nats_factory(jetstream=False).start()
    context = events.EventContext(**CTX)
    published: list[int] = []

    def open_emit_close() -> None:
        pub = publisher.Publisher(server.url, context=context)
        pub.emit(context.make(events.NodeOffline, node_id="n", reason="llama-server could not be kept up",
                              exit_code=4, uptime_s=0.01))
        pub.close(5)
        published.append(pub.published)

    got = collect(server.url, "mesh.node.offline.v1", open_emit_close, want=1)
    assert [m[1]["reason"] for m in got] == ["llama-server could not be kept up"]
    assert published == [1]


def test_instance_events_and_heartbeat(nats_factory: type[Nats]) -> None:
    server = nats_factory(jetstream=False).start()
    context = events.EventContext(**{**CTX, "instance_id": "node-7"})
    pub = publisher.Publisher(server.url, context=context)
    states: list[tuple[State, int | None, int | None]] = [
        ("starting", None, None), ("ready", None, None), ("restarting", 1, None), ("failed", None, 9),
        ("stopped", 0, None)]
    try:
        def transitions() -> None:
            previous: State = "stopped"
            for state, code, sig in states:
                t = Transition(state=state, previous=previous, pid=42, restarts=1, url="http://127.0.0.1:18080",
                               ts=1.5, exit_code=code, exit_signal=sig, lines=("x",), load_s=0.5)
                event = serve.instance_event(context, t)
                if event is not None:
                    pub.emit(event)
                previous = state

        got = dict(collect(server.url, "llama.instance.>", transitions, want=4))
        assert sorted(got) == [f"llama.instance.{k}.v1" for k in ("failed", "ready", "restarted", "stopped")]
        ready = got["llama.instance.ready.v1"]
        assert ready["instance_id"] == "node-7" and ready["pid"] == 42 and ready["url"] == "http://127.0.0.1:18080"
        assert ready["details"] == {"load_s": 0.5, "previous": "starting"}
        assert got["llama.instance.restarted.v1"]["exit_code"] == 1
        failed = got["llama.instance.failed.v1"]
        assert failed["exit_signal"] == 9 and failed["exit_code"] is None
        assert got["llama.instance.stopped.v1"]["exit_code"] == 0
        beats = collect(server.url, "mesh.node.announce.v1", lambda: pub.start_heartbeat(0.2), want=2)
        assert len(beats) == 2 and beats[0][1]["node_id"] == "node-7"
        assert beats[0][1]["capabilities"] and beats[0][1]["services"][0] == "llama-server"
    finally:
        pub.close(1)


def test_nats_credentials_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "wrapper.events")
    pub = publisher.Publisher("nats://user:hunter2@127.0.0.1:1", context=CTX, connect_timeout_s=0.2)
    time.sleep(0.6)
    pub.close(0.5)
    assert "hunter2" not in caplog.text and "unavailable" in caplog.text


@pytest.mark.llama
def test_selfcheck_event_carries_the_servers_token_counts(nats_factory: type[Nats], tmp_path: Path,
                                                          llama_url: str) -> None:
    server = nats_factory().start()
    port = int(llama_url.rsplit(":", 1)[1])
    profile = tiny_profile(tmp_path / "m.gguf", port, parallel=2)
    profile["selfcheck"] = {"max_tokens": 8, "prompt_tokens": 16, "warmup_requests": 0}
    registry = write_registry(tmp_path / "p.yaml", {"tiny": profile})
    s = settings.build("tiny", str(registry), environ={"NATS_URL": server.url, "WRAPPER_STATE_DIR": str(tmp_path)})
    context = events.EventContext(**CTX)
    pub = publisher.Publisher(server.url, context=context)
    target = selfcheck.Target(url=llama_url, spec=s.profile.selfcheck, state_dir=tmp_path, parallel=2)
    before = server_counters(llama_url)
    try:
        got = collect(server.url, "llama.selfcheck.v1",
                      lambda: pub.emit(events.SelfCheck.of(context, selfcheck.run(target))), want=1)
    finally:
        pub.close(2)
    after = server_counters(llama_url)
    [(_, event)] = got
    assert event["throughput_tps"] > 0 and event["verdict"] == "pass"
    assert event["completion_tokens"] == after["tokens_predicted_total"] - before["tokens_predicted_total"]
    assert event["prompt_tokens"] == after["prompt_tokens_total"] - before["prompt_tokens_total"]
    schema = events.SelfCheck.model_json_schema()
    jsonschema.validate(event, schema)


@pytest.mark.llama
def test_wrapper_serve_announces_ready_and_its_selfcheck(nats_factory: type[Nats], served: Any,
                                                         llama_server_bin: str, tiny_dense: Path) -> None:
    server = nats_factory(jetstream=False).start()
    env = {"NATS_URL": server.url, "WRAPPER_SELFCHECK_ENABLED": "true", "WRAPPER_SELFCHECK_PROMPT_TOKENS": "16",
           "WRAPPER_SELFCHECK_MAX_TOKENS": "8", "WRAPPER_INSTANCE_ID": "serve-e2e"}
    running: list[Any] = []
    got = dict(collect(server.url, "llama.>", lambda: running.append(served(llama_server_bin, tiny_dense, env=env)),
                       want=2, timeout=60))
    ready, check = got["llama.instance.ready.v1"], got["llama.selfcheck.v1"]
    assert ready["instance_id"] == "serve-e2e" and ready["model"]["name"] == tiny_dense.name
    assert check["verdict"] == "pass" and check["throughput_tps"] > 0
    assert check["completion_tokens"] == 8 * check["requests"]
    status = running[0].wait_for(lambda st: bool(st.get("selfcheck")))
    assert status["selfcheck"]["verdict"] == "pass"


@pytest.mark.llama
def test_real_supervisor_crash_publishes_its_exit_code(nats_factory: type[Nats], served: Any,
                                                       tmp_path: Path, tiny_dense: Path) -> None:
    """Regression: the publisher read `exit_code` while the supervisor sent `exit` as a string, so every
    llama.instance.restarted.v1 carried exit_code null (docs/events.md promised it)."""
    server = nats_factory(jetstream=False).start()
    fake = fake_binary(tmp_path)
    env = {"NATS_URL": server.url, "FAKE_LLAMA_MODE": "crash_after_ready", "FAKE_CRASH_AFTER_S": "1.5",
           "WRAPPER_INSTANCE_ID": "crashy"}
    running: list[Any] = []
    got = collect(server.url, "llama.instance.>",
                  lambda: running.append(served(fake, tiny_dense, env=env, supervise={"max_restarts": 1})),
                  want=4, timeout=40)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for subject, payload in got:
        by_subject.setdefault(subject, []).append(payload)
    [restarted] = by_subject["llama.instance.restarted.v1"]
    assert restarted["exit_code"] == 1 and restarted["exit_signal"] is None and restarted["instance_id"] == "crashy"
    assert restarted["reason"] and restarted["details"]["kind"]
    [failed] = by_subject["llama.instance.failed.v1"]
    assert failed["exit_code"] == 1 and "exit code 1" in failed["reason"]
    assert running[0].wait_exit() == 4
