"""bench-profile end to end through the CLI: several instances per config, and its events on a real NATS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from tests.loadgen_fixtures import Nats
from tests.test_events import collect

pytestmark = [pytest.mark.llama, pytest.mark.nats]


def test_two_instances_split_the_load_and_events_arrive(nats_factory: type[Nats], tmp_path: Path,
                                                        tiny_dense: Path, llama_server_bin: str) -> None:
    server = nats_factory().start()
    reg = write_registry(tmp_path / "reg.yaml", {"tiny": tiny_profile(tiny_dense, free_port())})
    env = {**os.environ, "LLAMA_SERVER_BIN": llama_server_bin, "NATS_URL": server.url,
           "WRAPPER_STATE_DIR": str(tmp_path / "state"), "LLM_PROFILES_CONFIG_PATH": str(reg),
           "LLM_PROFILE_NAME": "tiny"}
    out = tmp_path / "out"
    args = [sys.executable, "-m", "wrapper", "bench-profile", "--instances", "2", "--parallel", "1",
            "--concurrency", "2", "--prompt-words", "16", "--max-tokens", "4", "--requests", "4",
            "--min-reps", "3", "--max-reps", "3", "--no-baseline", "--out", str(out), "--json"]
    done: dict[str, subprocess.CompletedProcess[str]] = {}

    def sweep() -> None:
        done["proc"] = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, check=False)

    got = collect(server.url, "llama.benchmark.>", sweep, want=3, timeout=30)
    proc = done["proc"]
    assert proc.returncode == 0, proc.stderr
    subjects = [subject for subject, _ in got]
    assert subjects == ["llama.benchmark.started.v1", "llama.benchmark.cell.v1", "llama.benchmark.completed.v1"]
    cell, completed = got[1][1], got[2][1]
    assert cell["schema_version"] == 1 and cell["throughput_tps"] > 0 and cell["errors"] == 0
    summary = json.loads(proc.stdout)
    assert summary["best"]["config"] == "instances=2,parallel=1"
    assert completed["run_id"] == summary["run_id"]
    # Both servers of the config ran on their own ports and both processed requests (warm-up + 3 x 4 split).
    logs = sorted((out / "logs").glob("r0-*/instance-*.log"))
    assert len(logs) == 2
    texts = [p.read_text() for p in logs]
    ports = {line.rsplit(":", 1)[1] for t in texts for line in t.splitlines() if "listening on http" in line}
    assert len(ports) == 2
    assert all(t.count("processing task") >= 6 for t in texts), [t.count("processing task") for t in texts]
