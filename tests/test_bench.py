"""bench-profile against a real llama-server on the tiny model: files, store, failures, resume, auto-tune."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from wrapper import settings
from wrapper.bench import sweep as bench
from wrapper.bench.spec import load_spec
from wrapper.launch import flags
from wrapper.tuning import apply as tuning
from wrapper.tuning.store import default_path

pytestmark = [pytest.mark.llama, pytest.mark.slow]

FAST = {"client.prompt_words": [16], "client.max_tokens": [4], "repeat.requests": 4, "repeat.max_reps": 3,
        "repeat.min_reps": 3}


@pytest.fixture
def tiny_settings(clean_env: pytest.MonkeyPatch, tmp_path: Path, tiny_dense: Path,
                  llama_server_bin: str) -> settings.Settings:
    clean_env.setenv("LLAMA_SERVER_BIN", llama_server_bin)
    reg = write_registry(tmp_path / "reg.yaml", {"tiny": tiny_profile(tiny_dense, free_port())})
    clean_env.setenv("LLM_PROFILES_CONFIG_PATH", str(reg))
    clean_env.setenv("LLM_PROFILE_NAME", "tiny")
    return settings.build()


def test_2x2_sweep_writes_csv_jsonl_sqlite_and_report(tiny_settings: settings.Settings, tmp_path: Path) -> None:
    spec = load_spec(None, {**FAST, "server.parallel": [1, 2], "client.concurrency": [1, 2]})
    sweep = bench.open_sweep(tiny_settings, spec, tmp_path / "out")
    with sweep.store:
        outcome = bench.run(sweep)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").read_text().splitlines()))
    # 2 server configs x 2 loads + llama-server defaults at both loads.
    assert sorted(r["config"] for r in rows) == ["defaults"] * 2 + ["parallel=1"] * 2 + ["parallel=2"] * 2
    assert all(r["status"] == "ok" and float(r["throughput_tps"]) > 0 and int(r["reps"]) >= 3 for r in rows)
    assert all("--parallel" in r["argv"] or r["config"] == "defaults" for r in rows)
    assert all(r["model_id"] == outcome.summary["model_id"] and r["corpus_sha256"] for r in rows)
    lines = (tmp_path / "out" / "requests.jsonl").read_text().splitlines()
    assert len(lines) >= 6 * 3 * 4 and all(json.loads(line)["error"] is None for line in lines)
    with closing(sqlite3.connect(default_path(tiny_settings.env.state_path()))) as db:
        assert db.execute("SELECT COUNT(*) FROM cells WHERE run_id=?", (outcome.run_id,)).fetchone()[0] == 6
        assert db.execute("SELECT status FROM runs WHERE run_id=?", (outcome.run_id,)).fetchone()[0] == "completed"
    # The verdict comes from the paired comparison with the defaults; any of the three is honest here.
    assert outcome.summary["verdict"] in ("win", "defaults", "inconclusive") and outcome.summary["why"]
    assert (outcome.best_values is not None) == (outcome.summary["verdict"] == "win")
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count("<svg") >= 2 and "llama-server" in report and "Skipped cells" in report
    # Every measured (non-default) cell left a receipt for the planner, with its own slot count.
    from wrapper.plan import receipts

    got = receipts.load(receipts.path_in(tiny_settings.env.state_path()))
    assert len(got) == 4 and {r.kind for r in got} == {"bench"} and {r.parallel for r in got} == {1, 2}
    assert all(r.measured_tok_s > 0 for r in got)


def test_adaptive_sweep_screens_every_cell_then_races_a_shortlist_side_by_side(
        tiny_settings: settings.Settings, tmp_path: Path) -> None:
    spec = load_spec(None, {**FAST, "mode": "adaptive", "server.parallel": [1, 2, 4], "client.concurrency": [1, 2],
                            "adaptive.finalists": 2, "adaptive.rounds": 2, "adaptive.final_rounds": 1,
                            "confirm.budget_s": 20})
    sweep = bench.open_sweep(tiny_settings, spec, tmp_path / "out")
    with sweep.store:
        outcome = bench.run(sweep)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").read_text().splitlines()))
    screen = [r for r in rows if r["rung"] == "0" and r["status"] != "pruned"]
    dropped = [r for r in rows if r["status"] == "pruned"]
    race = [r for r in rows if r["rung"] == "1"]
    # Every tuned cell had one short run (one server start per config), but for the heavier load of a
    # config whose lighter one screened clearly slow (select.screen_drop), with the reason; no defaults cell.
    assert len(screen) + len(dropped) == 6 and all(r["status"] == "ok" and r["reps"] == "1" for r in screen)
    assert {(r["config"], r["client"].split(",")[0]) for r in screen} >= \
        {("parallel=1", "c=1"), ("parallel=2", "c=1"), ("parallel=4", "c=1")}
    assert all(r["client"].startswith("c=2,") and "adaptive screen" in r["reason"] for r in dropped)
    # The shortlist (2 configs, plus the one the model rates highest of the rest) ran one rep per round,
    # the two leaders one more round alone.
    assert 2 <= len(race) <= 3 and all(r["status"] == "ok" for r in race)
    assert sorted(r["reps"] for r in race) == ["2", "3", "3"][3 - len(race):]
    assert len({r["config"] for r in race}) == len(race)
    assert {(r["config"], r["client"]) for r in race} <= {(r["config"], r["client"]) for r in screen}
    logs = sorted(d.name for d in (tmp_path / "out" / "logs").iterdir())
    assert len([d for d in logs if d.startswith("r0-")]) == 3
    assert 1 <= len([d for d in logs if d.startswith("race-r1-")]) <= 3
    # The race's rows are what the candidate was picked from, then compared with the defaults as in a grid.
    assert outcome.summary["mode"] == "adaptive" and outcome.summary["candidate"] is not None
    assert outcome.selection.best is not None and outcome.selection.best.rung == 1
    assert len(outcome.selection.best.reps) == 3  # a leader: it ran the final round
    assert outcome.summary["verdict"] in ("win", "defaults", "inconclusive") and outcome.summary["why"]


def test_failing_cell_is_recorded_and_sweep_goes_on(tiny_settings: settings.Settings, tmp_path: Path) -> None:
    # A quantized V cache without flash attention: this llama-server refuses to create the context.
    spec = load_spec(None, {**FAST, "server.flash_attn": ["off"], "server.cache_type_v": ["q4_0", "f16"],
                            "client.concurrency": [1], "baseline": False})
    sweep = bench.open_sweep(tiny_settings, spec, tmp_path / "out")
    with sweep.store:
        outcome = bench.run(sweep)
    by_key = {r.server_key: r for r in outcome.final}
    bad, good = by_key["flash_attn=off,cache_type_v=q4_0"], by_key["flash_attn=off,cache_type_v=f16"]
    assert bad.status == "failed" and "server failed to start" in (bad.reason or "")
    # The sweep went on and measured the next config (its status may be "errors" if a connection drops).
    assert good.status in ("ok", "errors") and good.throughput_tps > 0 and good.requests >= 4


def test_resume_of_a_successive_halving_run_is_refused_with_one_line(tiny_settings: settings.Settings,
                                                                     tmp_path: Path) -> None:
    """Review finding: its rungs of short runs would have passed for the race's rows and picked the winner."""
    out = tmp_path / "old-run"
    out.mkdir()
    spec = {"mode": "adaptive", "adaptive": {"eta": 3, "first_requests": 4}}
    (out / "run.json").write_text(json.dumps({"run_id": "run-old", "profile": tiny_settings.profile_name,
                                              "spec": spec}))
    done = subprocess.run([sys.executable, "-m", "wrapper", "bench-profile", "--resume", str(out)], check=False,
                          env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "successive-halving" in errors[0] and "Traceback" not in done.stderr


def test_interrupt_keeps_cells_and_resume_finishes(tiny_settings: settings.Settings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [sys.executable, "-m", "wrapper", "bench-profile", "--parallel", "1,2", "--concurrency", "1,2",
            "--prompt-words", "16", "--max-tokens", "16", "--requests", "8", "--min-reps", "3", "--max-reps", "3",
            "--out", str(out)]
    proc = subprocess.Popen(args, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    csv_path = out / "results.csv"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if csv_path.is_file() and len(csv_path.read_text().splitlines()) >= 3:  # header + 2 cells
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err
    kept = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert 2 <= len(kept) < 6
    db_path = default_path(tiny_settings.env.state_path())
    with closing(sqlite3.connect(db_path)) as db:
        before = dict(db.execute("SELECT cell_key, created_at FROM cells").fetchall())

    done = subprocess.run([sys.executable, "-m", "wrapper", "bench-profile", "--resume", str(out), "--json"],
                          check=False, env=dict(os.environ), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    with closing(sqlite3.connect(db_path)) as db:
        after = dict(db.execute("SELECT cell_key, created_at FROM cells").fetchall())
    assert len(after) == 6
    assert all(after[k] == t for k, t in before.items()), "resume re-ran cells that were already measured"
    summary = json.loads(done.stdout)
    # The resumed run finishes the same run with every cell measured once; which config wins (if any) is the
    # host's noise to decide, so it is not asserted here (tests/test_bench_stats.py judges synthetic numbers).
    assert summary["cells_measured"] == 6 and summary["cells_failed"] == 0
    assert summary["verdict"] in ("win", "defaults", "inconclusive")


def test_tuning_layer_applies_same_key_and_refuses_other_hardware(tiny_settings: settings.Settings,
                                                                  tmp_path: Path) -> None:
    spec = load_spec(None, {**FAST, "server.parallel": [2], "client.concurrency": [2], "baseline": False})
    sweep = bench.open_sweep(tiny_settings, spec, tmp_path / "out")
    with sweep.store:
        outcome = bench.run(sweep)
    key = sweep.key
    values, origin, notes = tuning.tuning_layer(tiny_settings, key.model_id, key.hardware_fp, key.build)
    assert values == {"llamacpp.parallel": 2}
    assert origin == f"tuning:{outcome.run_id}" and "applied" in notes[0]
    tuned, skipped = tiny_settings.with_layer(values, origin)
    assert skipped == [] and tuned.origin("llamacpp.parallel") == origin
    argv = flags.derive(tuned, sweep.caps, sweep.model_file).argv
    assert argv[argv.index("--parallel") + 1] == "2"

    values, origin, notes = tuning.tuning_layer(tiny_settings, key.model_id, "other-machine", key.build)
    assert values == {} and origin == ""
    assert "not applied" in notes[0] and "hardware fingerprint" in notes[0] and outcome.run_id in notes[0]


def _wrapper(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wrapper", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120, check=False)


def _parallel(flags_json: str) -> dict[str, str]:
    data = json.loads(flags_json)
    arg = next(o for o in data["origins"] if o["setting"] == "llamacpp.parallel")
    return {"value": arg["value"], "origin": arg["origin"], "decisions": "\n".join(data["decisions"])}


def test_serve_auto_tune_applies_best_and_shows_origin(tiny_settings: settings.Settings, tmp_path: Path) -> None:
    spec = load_spec(None, {**FAST, "server.parallel": [2], "client.concurrency": [2], "baseline": False})
    sweep = bench.open_sweep(tiny_settings, spec, tmp_path / "out")
    with sweep.store:
        outcome = bench.run(sweep)
    origin = f"tuning:{outcome.run_id}"

    plain = _parallel(_wrapper(["flags", "--json"]).stdout)
    assert plain["value"] == "1" and plain["origin"] == "profile"  # without --auto-tune nothing changes
    tuned = _parallel(_wrapper(["flags", "--json", "--auto-tune"]).stdout)
    assert tuned["value"] == "2" and tuned["origin"] == origin and "auto-tune: applied" in tuned["decisions"]
    pinned = _parallel(_wrapper(["flags", "--json", "--auto-tune"], LLAMACPP_PARALLEL_OVERRIDE="3").stdout)
    assert pinned["value"] == "3" and pinned["origin"] == "env:LLAMACPP_PARALLEL_OVERRIDE"
    shown = json.loads(_wrapper(["profiles", "show", "--json", "--auto-tune"]).stdout)
    row = next(r for r in shown["values"] if r["setting"] == "llamacpp.parallel")
    assert row["value"] == 2 and row["origin"] == origin

    # The real start: `serve --auto-tune` runs llama-server with the tuned value and says so on /status.
    status_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wrapper", "serve", "--auto-tune"],
                            env={**os.environ, "WRAPPER_STATUS_PORT": str(status_port),
                                 "WRAPPER_SELFCHECK_ENABLED": "true"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=2).json()
                if status["state"] == "ready":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        assert status is not None and status["state"] == "ready", status
        args = {a["setting"]: a for a in status["llama_server"]["args"]}
        assert args["llamacpp.parallel"]["value"] == "2" and args["llamacpp.parallel"]["origin"] == origin
        assert any("auto-tune: applied" in d for d in status["decisions"])
        # The self-check repeats the tuned cell's load (c=2, 16 words, 4 tokens) and is judged against it.
        while status["selfcheck"] is None and time.monotonic() < deadline:
            time.sleep(0.3)
            status = httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=2).json()
        check = status["selfcheck"]
        assert check is not None, status
        assert check["expected_source"] == f"bench-profile {outcome.run_id}"
        assert check["expected_tps"] == pytest.approx(outcome.selection.best.throughput_tps)
        assert check["concurrency"] == 2 and check["ratio"] is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_best_config_from_other_hardware_is_not_applied(tiny_settings: settings.Settings, tmp_path: Path) -> None:
    spec = load_spec(None, {**FAST, "server.parallel": [2], "client.concurrency": [2], "baseline": False})
    sweep = bench.open_sweep(tiny_settings, spec, tmp_path / "out")
    with sweep.store:
        outcome = bench.run(sweep)
    with closing(sqlite3.connect(default_path(tiny_settings.env.state_path()))) as db, db:
        assert db.execute("UPDATE best SET hardware_fp='a-different-gpu-box'").rowcount >= 1
    result = _parallel(_wrapper(["flags", "--json", "--auto-tune"]).stdout)
    assert result["value"] == "1" and result["origin"] == "profile"
    assert "not applied" in result["decisions"] and outcome.run_id in result["decisions"]
    assert "hardware fingerprint" in result["decisions"]


def _bench_profile(tmp_path: Path, model: Path, marker: str) -> subprocess.Popen[bytes]:
    """A sweep long enough to be stopped mid-way; `marker` in its environment finds every process it started.
    The stop grace is short: now and then llama-server does not exit on its SIGTERM (measured: 1 stop in 10
    waited out the whole grace), and the test must not wait out the default 10 s."""
    profile = {**tiny_profile(model, free_port()), "supervise": {"stop_grace_s": 3.0}}
    registry = write_registry(tmp_path / "bench-reg.yaml", {"tiny": profile})
    args = [sys.executable, "-m", "wrapper", "bench-profile", "--config", str(registry), "--parallel", "1,2,3",
            "--concurrency", "1,2", "--prompt-words", "16", "--max-tokens", "32", "--requests", "8", "--min-reps", "3",
            "--max-reps", "3", "--out", str(tmp_path / "out")]
    return subprocess.Popen(args, env={**os.environ, "BENCH_TEST_MARKER": marker}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _marked(marker: str, but: int) -> list[psutil.Process]:
    """Live (not zombie) processes carrying the marker, other than the bench process itself."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != but and proc.status() != psutil.STATUS_ZOMBIE and \
                    proc.environ().get("BENCH_TEST_MARKER") == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _wait_mid_sweep(proc: subprocess.Popen[bytes], csv_path: Path, marker: str) -> list[psutil.Process]:
    """Wait until one cell is recorded and a llama-server is serving the next; return the servers."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if csv_path.is_file() and len(csv_path.read_text().splitlines()) >= 2:
            # By process name: each server's parent-death watcher (a forked copy of the exec shim, whose command
            # line names llama-server too) is llama-server's child, not the sweep's; counting it made this wait
            # succeed only in the instant between a server's spawn and its watcher's fork.
            servers = [p for p in _marked(marker, proc.pid) if _name(p) == "llama-server"]
            if servers and all(p.ppid() == proc.pid for p in servers):
                return servers
        time.sleep(0.05)
    raise AssertionError(f"sweep never got mid-way (exit {proc.poll()})")


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _left_after(marker: str, but: int, wait_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + wait_s
    while (left := _marked(marker, but)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _reap(left: list[psutil.Process]) -> None:
    for p in left:  # a failing test must not leak servers into the next one
        with contextlib.suppress(psutil.Error):
            p.kill()


def test_kill_9_of_bench_profile_leaves_no_llama_server(tiny_settings: settings.Settings, tmp_path: Path,
                                                        tiny_dense: Path) -> None:
    # Regression (issue 11): the sweep's own process code had no parent-death guard, so a SIGKILLed
    # bench-profile left its llama-server running.
    marker = uuid.uuid4().hex
    proc = _bench_profile(tmp_path, tiny_dense, marker)
    try:
        servers = _wait_mid_sweep(proc, tmp_path / "out" / "results.csv", marker)
        groups = {os.getpgid(p.pid) for p in servers}
        assert groups == {p.pid for p in servers}  # each server leads its own process group
        proc.kill()
        proc.communicate(timeout=10)
        left = _left_after(marker, proc.pid, 5.0)
        assert left == [], [p.cmdline() for p in left]
        in_groups = [p.pid for p in psutil.process_iter() if _pgid(p.pid) in groups and
                     p.status() != psutil.STATUS_ZOMBIE]
        assert in_groups == []
    finally:
        proc.kill()
        _reap(_marked(marker, proc.pid))


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_mid_sweep_stops_servers_keeps_results_and_exits_130(tiny_settings: settings.Settings,
                                                                    tmp_path: Path, tiny_dense: Path,
                                                                    sig: signal.Signals) -> None:
    marker = uuid.uuid4().hex
    out = tmp_path / "out"
    proc = _bench_profile(tmp_path, tiny_dense, marker)
    try:
        servers = _wait_mid_sweep(proc, out / "results.csv", marker)
        proc.send_signal(sig)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
        assert proc.returncode == 130, err.decode()
        assert took < 8, f"stopping took {took:.1f}s"
        # Its servers were stopped by the sweep itself, not by the parent-death signal after it exited.
        assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in servers)
        assert _left_after(marker, proc.pid, 1.0) == []
        lines = err.decode().strip().splitlines()
        assert lines[-1].startswith(f"bench-profile interrupted by {sig.name}; ")  # a stop asked for: no "error:"
        assert f"--resume {out}" in lines[-1] and "Traceback" not in err.decode()
        # The files and the store hold every finished cell, whole.
        rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
        # Up to all 8 cells: on a busy host the stop may land in the paired comparison that follows the cells.
        assert 1 <= len(rows) <= 8 and all(None not in r.values() and r["status"] for r in rows)
        for line in (out / "requests.jsonl").read_text().splitlines():
            json.loads(line)
        with closing(sqlite3.connect(default_path(tiny_settings.env.state_path()))) as db:
            run_id = json.loads((out / "run.json").read_text())["run_id"]
            assert db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()[0] == "interrupted"
            assert db.execute("SELECT COUNT(*) FROM cells WHERE run_id=?", (run_id,)).fetchone()[0] == len(rows)
    finally:
        proc.kill()
        _reap(_marked(marker, proc.pid))
