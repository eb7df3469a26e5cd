"""Fleet sharing of best configs through a real nats-server's JetStream key-value bucket."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from tests.loadgen_fixtures import Nats
from wrapper import settings
from wrapper.bench import sweep as bench
from wrapper.bench.spec import load_spec
from wrapper.tuning import apply as tuning
from wrapper.tuning import fleet
from wrapper.tuning.store import BestConfig, Store, TuningKey, default_path

pytestmark = pytest.mark.nats

KEY = TuningKey("qwen2.5-7b", "ab" * 32, "f88f0bf3f0421bc0", "0.6.0-dev+1234abcd")


def _best(key: TuningKey = KEY, run_id: str = "run-20261128-010203-abcdef") -> BestConfig:
    return BestConfig(key, run_id, "parallel=4|c=8,p=64,n=64", {"llamacpp.parallel": 4}, 812.5, 640.0, 0.27,
                      ["llama-server", "--parallel", "4"], 1795829744.0)


def _settings(tmp_path: Path, model: Path, nats_url: str, node: str) -> settings.Settings:
    reg = write_registry(tmp_path / "reg.yaml", {"qwen2.5-7b": tiny_profile(model, free_port())})
    env = {"WRAPPER_STATE_DIR": str(tmp_path / node), "NATS_URL": nats_url, "HOME": str(tmp_path),
           "LLAMA_SERVER_BIN": os.environ.get("LLAMA_SERVER_BIN", "")}
    return settings.build("qwen2.5-7b", str(reg), environ=env)


def test_kv_key_is_valid_and_keeps_the_parts_apart() -> None:
    key = TuningKey("qwen2.5-32b 5090", "stat:1:2", "fp", "b1/x")
    assert fleet.kv_key(key) == "qwen2_5-32b_5090.stat_1_2.fp.b1_x"


def test_roundtrip_and_another_node_applies_it(nats_factory: type[Nats], tmp_path: Path,
                                               tiny_dense: Path) -> None:
    server = nats_factory().start()
    assert fleet.publish_best(server.url, _best()).startswith("fleet: best config shared")
    got, why = fleet.fetch_best(server.url, KEY)
    # What comes back is what was shared, less the display-only argv (never taken from the fleet).
    assert why is None and got == dataclasses.replace(_best(), argv=[])
    missing, why = fleet.fetch_best(server.url, TuningKey("qwen2.5-7b", "cd" * 32, KEY.hardware_fp, KEY.build))
    assert missing is None and why == "fleet: no shared best config for this setup"

    # Node B has no tuning store at all; with NATS_URL set it takes the shared config and keeps a copy.
    s = _settings(tmp_path, tiny_dense, server.url, "node-b")
    values, origin, notes = tuning.tuning_layer(s, KEY.model_id, KEY.hardware_fp, KEY.build)
    assert values == {"llamacpp.parallel": 4} and origin == "fleet:run-20261128-010203-abcdef"
    assert "came from the fleet" in notes[0] and "applied" in notes[1]
    with Store(default_path(tmp_path / "node-b")) as store:
        assert store.best_for(KEY) is not None
    # Other hardware: the fleet has nothing for that key, so nothing is applied.
    values, _, notes = tuning.tuning_layer(s, KEY.model_id, "other-fingerprint", KEY.build)
    assert values == {} and any("not applied" in n for n in notes)


def test_fleet_down_or_without_jetstream_is_only_a_note(nats_factory: type[Nats], tmp_path: Path,
                                                        tiny_dense: Path) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    got, why = fleet.fetch_best(down, KEY, timeout_s=1.0)
    assert got is None and why is not None and why.startswith("fleet: not consulted")
    assert fleet.publish_best(down, _best(), timeout_s=1.0).startswith("fleet: best config not shared")
    assert time.monotonic() - started < 6
    plain = nats_factory(jetstream=False).start()
    got, why = fleet.fetch_best(plain.url, KEY, timeout_s=1.0)
    assert got is None and why is not None and why.startswith("fleet: not consulted")
    s = _settings(tmp_path, tiny_dense, down, "node-c")
    values, origin, notes = tuning.tuning_layer(s, KEY.model_id, KEY.hardware_fp, KEY.build)
    assert values == {} and origin == "" and notes[0].startswith("auto-tune: fleet: not consulted")


@pytest.mark.llama
def test_bench_profile_shares_its_best_config(nats_factory: type[Nats], tmp_path: Path,
                                              tiny_dense: Path, llama_server_bin: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    server = nats_factory().start()
    monkeypatch.setenv("LLAMA_SERVER_BIN", llama_server_bin)
    s = _settings(tmp_path, tiny_dense, server.url, "node-a")
    spec = load_spec(None, {"server.parallel": [2], "client.concurrency": [2], "client.prompt_words": [16],
                            "client.max_tokens": [4], "repeat.requests": 4, "repeat.min_reps": 3,
                            "repeat.max_reps": 3, "baseline": False})
    sweep = bench.open_sweep(s, spec, tmp_path / "out")
    with sweep.store:
        outcome = bench.run(sweep)
    assert any(n.startswith("fleet: best config shared") for n in outcome.notes), outcome.notes
    shared, why = fleet.fetch_best(server.url, sweep.key)
    assert why is None and shared is not None and shared.run_id == outcome.run_id
    assert shared.values == {"llamacpp.parallel": 2}
