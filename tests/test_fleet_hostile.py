"""The fleet tuning bucket as a hostile channel (issue 15): a real nats-server, poisoned entries written
with nats-py, and NATS credentials/TLS passed the documented nats-py way."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from tests.loadgen_fixtures import Nats, nats_factory, stop, wait_port  # noqa: F401  (fixture)
from wrapper import settings
from wrapper.bench.spec import SERVER_DIMS
from wrapper.errors import ConfigError
from wrapper.events.publisher import NatsAccess
from wrapper.tuning import apply as tuning
from wrapper.tuning import fleet
from wrapper.tuning.store import BestConfig, Store, TuningKey, default_path

pytestmark = pytest.mark.nats

KEY = TuningKey("qwen2.5-7b", "ab" * 32, "f88f0bf3f0421bc0", "0.6.0-dev+1234abcd")
RUN = "run-20261128-010203-abcdef"


def _entry(**changes: object) -> dict[str, object]:
    best = BestConfig(KEY, RUN, "parallel=4|c=8,p=64,n=64", {"llamacpp.parallel": 4}, 812.5, 640.0, 0.27,
                      ["llama-server", "--parallel", "4"], 1795829744.0)
    return {**asdict(best), **changes}


def _put(url: str, raw: bytes) -> None:
    async def put() -> None:
        import nats

        nc = await nats.connect(url)
        kv = await nc.jetstream().create_key_value(bucket=fleet.BUCKET)
        await kv.put(fleet.kv_key(KEY), raw)
        await nc.close()

    asyncio.run(put())


def _settings(tmp_path: Path, model: Path, env: dict[str, str]) -> settings.Settings:
    reg = write_registry(tmp_path / "reg.yaml", {"qwen2.5-7b": tiny_profile(model, free_port())})
    return settings.build("qwen2.5-7b", str(reg), environ={"WRAPPER_STATE_DIR": str(tmp_path / "state"),
                                                         "HOME": str(tmp_path), **env})


def test_tunable_is_what_a_sweep_varies() -> None:
    swept = {f"llamacpp.{d}" for d in SERVER_DIMS if d != "instances"}
    assert {p for p in fleet.TUNABLE if p.startswith("llamacpp.")} == swept
    assert {p for p in fleet.TUNABLE if not p.startswith("llamacpp.")} == {
        "selfcheck.concurrency", "selfcheck.prompt_tokens", "selfcheck.max_tokens"}


POISON = {
    "drop_api_key": (_entry(values={"llamacpp.parallel": 4, "llamacpp.api_key_file": None}),
                     "values.llamacpp.api_key_file"),
    "bind_everywhere": (_entry(values={"llamacpp.host": "0.0.0.0"}), "values.llamacpp.host"),
    "other_port": (_entry(values={"llamacpp.port": 1}), "values.llamacpp.port"),
    "extra_flags": (_entry(values={"llamacpp.extra_args": ["--rpc", "evil:50052"]}), "values.llamacpp.extra_args"),
    "other_model": (_entry(values={"llamacpp.model_path": "/etc/passwd"}), "values.llamacpp.model_path"),
    "wrong_type": (_entry(values={"llamacpp.parallel": "lots"}), "values.llamacpp.parallel"),
    "negative": (_entry(values={"llamacpp.ctx_size": -1}), "values.llamacpp.ctx_size"),
    "unknown_cache_type": (_entry(values={"llamacpp.cache_type_k": "q9_9"}), "values.llamacpp.cache_type_k"),
    "unknown_top_level_key": (_entry(extra_args=["--api-key", "x"]), "extra_args"),
    "control_chars_in_run_id": (_entry(run_id="run\n\x1b[31mfake"), "run_id"),
    "bad_load": (_entry(load={"concurrency": 0, "prompt_words": 1, "max_tokens": 1}), "load.concurrency"),
    "not_a_number": (_entry(throughput_tps="fast"), "throughput_tps"),
}


@pytest.mark.parametrize("name", [*POISON, "malformed_json", "not_an_object"])
def test_poisoned_bucket_entry_is_rejected_in_one_line_and_never_stored(
        name: str, nats_factory: type[Nats], tmp_path: Path, tiny_dense: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    server = nats_factory().start()
    if name == "malformed_json":
        raw, field = b'{"key": {"profile": ', "entry"
    elif name == "not_an_object":
        raw, field = b'["llamacpp.parallel", 4]', "entry"
    else:
        entry, field = POISON[name]
        raw = json.dumps(entry).encode()
    _put(server.url, raw)
    s = _settings(tmp_path, tiny_dense, {"NATS_URL": server.url})
    with caplog.at_level(logging.WARNING):
        values, origin, notes = tuning.tuning_layer(s, KEY.model_id, KEY.hardware_fp, KEY.build)
    assert values == {} and origin == ""
    assert any("rejected" in n for n in notes), notes
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"at {field}:" in warnings[0], warnings
    assert "\n" not in warnings[0] and "\x1b" not in warnings[0]
    store = default_path(tmp_path / "state")
    if store.exists():
        with Store(store) as db:
            assert db.bests() == []


def test_a_valid_entry_is_applied_with_its_fleet_origin_and_keeps_it(
        nats_factory: type[Nats], tmp_path: Path, tiny_dense: Path) -> None:  # noqa: F811
    server = nats_factory().start()
    _put(server.url, json.dumps(_entry(values={"llamacpp.parallel": 4, "llamacpp.flash_attn": "on"},
                                       created_at=4e12)).encode())
    s = _settings(tmp_path, tiny_dense, {"NATS_URL": server.url})
    values, origin, notes = tuning.tuning_layer(s, KEY.model_id, KEY.hardware_fp, KEY.build)
    assert values == {"llamacpp.parallel": 4, "llamacpp.flash_attn": "on"}
    assert origin == f"fleet:{RUN}", notes
    server.kill()  # the kept copy is used next time, still shown as the fleet's
    values, origin, _ = tuning.tuning_layer(s, KEY.model_id, KEY.hardware_fp, KEY.build)
    assert origin == f"fleet:{RUN}" and values["llamacpp.parallel"] == 4
    with Store(default_path(tmp_path / "state")) as db:
        (kept,) = db.bests()
    assert kept.argv == [] and kept.created_at < 4e12  # display-only argv dropped; no far-future ranking


def test_nats_access_passes_creds_and_refuses_missing_files(tmp_path: Path) -> None:
    creds = tmp_path / "wrapper.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    env = settings.Environment.from_environ({"NATS_URL": "nats://127.0.0.1:4222", "NATS_CREDS": str(creds)})
    assert NatsAccess.from_env(env).options() == {"user_credentials": str(creds)}
    missing = settings.Environment.from_environ({"NATS_URL": "nats://h:4222", "NATS_TLS_CA": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match=r"NATS_TLS_CA=.*not a readable file"):
        NatsAccess.from_env(missing)
    with pytest.raises(ConfigError, match="NATS_TLS_CERT and NATS_TLS_KEY"):
        settings.Environment.from_environ({"NATS_URL": "nats://h:4222", "NATS_TLS_CERT": str(creds)})


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)


def test_fleet_over_mutual_tls_with_nats_tls_files(nats_server_bin: str, tmp_path: Path) -> None:
    _pki(tmp_path)
    port = free_port()
    proc = subprocess.Popen([nats_server_bin, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js"),
                             "--tlsverify", "--tlscert", str(tmp_path / "server.pem"), "--tlskey",
                             str(tmp_path / "server.key"), "--tlscacert", str(tmp_path / "ca.pem")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        url = f"tls://127.0.0.1:{port}"
        full = settings.Environment.from_environ({
            "NATS_URL": url, "NATS_TLS_CA": str(tmp_path / "ca.pem"), "NATS_TLS_CERT": str(tmp_path / "client.pem"),
            "NATS_TLS_KEY": str(tmp_path / "client.key")})
        access = NatsAccess.from_env(full)
        best = BestConfig(KEY, RUN, "c", {"llamacpp.parallel": 2}, 10.0, None, None, [], 1.0)
        assert fleet.publish_best(access, best).startswith("fleet: best config shared")
        got, why = fleet.fetch_best(access, KEY)
        assert why is None and got is not None and got.values == {"llamacpp.parallel": 2}
        # Without the client certificate the server refuses the connection: no config, only a note.
        ca_only = NatsAccess(url, tls_ca=str(tmp_path / "ca.pem"))
        got, why = fleet.fetch_best(ca_only, KEY, timeout_s=2.0)
        assert got is None and why is not None and why.startswith("fleet: not consulted")
    finally:
        stop(proc)
