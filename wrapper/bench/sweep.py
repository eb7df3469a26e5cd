"""`wrapper bench-profile`: run a sweep, record every cell, pick the best config.

Cells run grouped by server config, so llama-server restarts only when its flags change. Each start is
followed by a warm-up; each cell repeats until its throughput's 95% CI is tight (or a cap). A cell whose
server fails to start, dies, or whose requests fail is recorded with the reason and the sweep goes on.
Every finished cell is committed to the store and the result files at once (each file replaced whole), so
a stop keeps what was measured and `--resume DIR` runs only what is missing. A stop (SIGTERM, SIGINT or
SIGHUP recorded in `Sweep.stop`, see bench/signals.py) is acted on between steps and aborts the cell being
measured; a cell is recorded only when it finished.

Adaptive mode screens, then races: every cell gets one run of two whole waves (one server start per
config, all its client loads in that start, the lightest first; the heavier ones are skipped when it came out
clearly slow, select.screen_drop); a shortlist of configs chosen from the screen with a main-effects model
(select.shortlist) is then raced side by side in interleaved rounds of a grid repetition each (bench/race.py),
the two leaders race on alone for a few more rounds, and the race's rows are what the best is picked from,
their ties judged round by round. With no more cells than finalists there is nothing to screen: they are
measured like a grid.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wrapper.bench import fit, measuring, outcome, race
from wrapper.bench.outcome import Outcome
from wrapper.bench.select import screen_drop, shortlist
from wrapper.bench.signals import Stopped, StopRequest
from wrapper.bench.spec import (
    Cell,
    Pruned,
    ServerConfig,
    SweepSpec,
    effective,
    plan_cells,
    prune_reason,
    swept_dims,
)
from wrapper.errors import ConfigError, Interrupted
from wrapper.launch.flags import Capabilities
from wrapper.measure import loadgen
from wrapper.settings import Settings
from wrapper.tuning.records import CellResult
from wrapper.tuning.store import (
    RunMeta,
    Store,
    TuningKey,
    atomic_write_text,
    default_path,
    write_csv,
)

log = logging.getLogger("wrapper.bench")

Publish = Callable[[str, dict[str, Any]], None]


def _no_events(subject: str, payload: dict[str, Any]) -> None:
    """Default publisher: events are optional (wrapper.events.payloads wires NATS in)."""


@dataclass
class Sweep:
    settings: Settings
    caps: Capabilities
    model_file: Path
    key: TuningKey
    spec: SweepSpec
    out_dir: Path
    store: Store
    meta: RunMeta
    publish: Publish = _no_events
    results: list[CellResult] = field(default_factory=list)  # every row of this run, all rungs
    pruned: list[Pruned] = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)  # filled by signal handlers (bench/signals.py)
    cells: list[Cell] = field(default_factory=list)  # every planned cell
    tokens: dict[int, int] | None = None  # prompt tokens per corpus length, counted by the first server
    raced: bool = False  # the final rows are an adaptive race's, measured side by side round by round

    @property
    def profile_values(self) -> dict[str, Any]:
        return dict(self.settings.server.model_dump())


def new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def open_sweep(s: Settings, spec: SweepSpec | None, out_dir: Path | None, *, resume: Path | None = None,
               publish: Publish = _no_events) -> Sweep:
    """Everything a run needs: binary, model identity, tuning key, store and run record (new or resumed)."""
    from wrapper.launch.prepare import prepare
    from wrapper.tuning import apply as tuning

    if resume is not None:
        try:
            saved = json.loads((resume / "run.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume {resume}: no readable run.json ({exc})",
                              hint="pass the --out directory of an earlier bench-profile run") from None
        old_search = saved["spec"].get("mode") == "adaptive" and "eta" in saved["spec"].get("adaptive", {})
        if old_search:  # its rungs of short runs would pass for the race's rows and pick the winner
            raise ConfigError(f"--resume {resume}: this run was made by the earlier successive-halving search, "
                              "which the screen-and-race cannot continue",
                              hint="start a new run; the finished cells stay in that directory's results.csv")
        spec, out_dir, run_id = SweepSpec.model_validate(saved["spec"]), resume, saved["run_id"]
        if saved["profile"] != s.profile_name:
            raise ConfigError(f"--resume {resume}: run is for profile {saved['profile']!r}, not {s.profile_name!r}")
    else:
        run_id = new_run_id()
        out_dir = out_dir or s.env.state_path() / "bench" / run_id
    assert spec is not None and out_dir is not None
    # The same prepare path as `serve` (model, host measured once, plan layer for n_gpu_layers: auto), so a
    # cell measures the -ngl that `serve` would run; the tuning layer is left out: a sweep tunes the profile.
    launch = prepare(s, auto_tune=False, fetch=True)
    s, caps = launch.settings, launch.capabilities
    # The same key `serve --auto-tune` looks up.
    key = tuning.key_for(s, launch.model_file, launch.sha256, launch.host.fingerprint, version=caps.version,
                         binary=caps.path)
    meta = RunMeta(run_id, key, spec.mode, json.dumps(spec.model_dump()), str(out_dir), loadgen.CORPUS_SHA256,
                   spec.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        atomic_write_text(out_dir / "run.json", json.dumps(
            {"run_id": run_id, "profile": s.profile_name, "spec": spec.model_dump(), "key": key.__dict__}, indent=2))
    store = Store(default_path(s.env.state_path()))
    return Sweep(s, caps, launch.model_file, key, spec, out_dir, store, meta, publish)


def check_spec(s: Settings, spec: SweepSpec) -> None:
    """A swept knob pinned by an env override would measure the same server under several names."""
    origins = {d: s.origin(f"llamacpp.{d}") for d in swept_dims(spec)}
    pinned = [f"{d} ({origin})" for d, origin in origins.items() if origin.startswith("env:")]
    if pinned:
        raise ConfigError(f"bench-profile sweeps {', '.join(pinned)}, pinned by an environment override",
                          hint="unset the override, or drop that dimension from the sweep")


def run(sw: Sweep) -> Outcome:
    """Run (or resume) the sweep. A stop or Ctrl-C stops servers, keeps every finished cell, and raises
    Interrupted."""
    started = time.monotonic()
    check_spec(sw.settings, sw.spec)
    cells, sw.pruned = plan_cells(sw.spec, sw.profile_values)
    sw.cells = cells
    if not [c for c in cells if not c.server.baseline] and sw.pruned:
        raise ConfigError(f"bench-profile: no swept config fits its prompts: {sw.pruned[0].reason}",
                          hint="raise ctx_size, lower parallel, --prompt-words or --max-tokens")
    sw.results = sw.store.cells(sw.meta.run_id)
    sw.store.begin_run(sw.meta)
    sw.publish("llama.benchmark.started.v1", {
        "run_id": sw.meta.run_id, "profile": sw.key.profile, "model_id": sw.key.model_id, "mode": sw.spec.mode,
        "hardware_fingerprint": sw.key.hardware_fp, "build": sw.key.build, "cells": len(cells),
        "pruned": len(sw.pruned), "spec": sw.spec.model_dump(), "out_dir": str(sw.out_dir)})
    for p in sw.pruned:
        log.info("pruned %s: %s", p.cell.key, p.reason)
    try:
        sw.stop.check()
        final = _grid(sw, cells) if sw.spec.mode == "grid" else _adaptive(sw, cells)
        # Inside the try: the paired comparison against the defaults starts servers too, and a stop there is
        # the same interruption (seen: SIGHUP during it escaped as a traceback, exit 1). Nothing is stored
        # before its verdict, so a resumed run simply compares again.
        return outcome.finish(sw, final, started)
    except ConfigError:
        _write_files(sw)
        sw.store.finish_run(sw.meta.run_id, "refused", {"measured": len(sw.results)})
        raise
    except (KeyboardInterrupt, Stopped):
        _write_files(sw)
        sw.store.finish_run(sw.meta.run_id, "interrupted", {"measured": len(sw.results)})
        by = f" by {sw.stop.name}" if sw.stop.requested else ""
        raise Interrupted(f"bench-profile interrupted{by}; {len(sw.results)} cells kept in {sw.out_dir}; "
                          f"continue with: wrapper bench-profile --resume {sw.out_dir}") from None


def _done(sw: Sweep, rung: int) -> dict[str, CellResult]:
    return {r.cell_key: r for r in sw.results if r.rung == rung}


def _grid(sw: Sweep, cells: Sequence[Cell]) -> list[CellResult]:
    done = _done(sw, 0)
    todo = [c for c in cells if c.key not in done]
    _measure_all(sw, todo, rung=0)
    done = _done(sw, 0)
    return [done[c.key] for c in cells if c.key in done]


def _adaptive(sw: Sweep, cells: Sequence[Cell]) -> list[CellResult]:
    a = sw.spec.adaptive
    contenders = [c for c in cells if not c.server.baseline]
    by_key = {c.key: c for c in contenders}
    if len(contenders) > a.finalists:
        done = _done(sw, 0)
        _measure_all(sw, [c for c in contenders if c.key not in done], rung=0, screen=True)
        screened = [r for k, r in _done(sw, 0).items() if k in by_key]
        finalists = [by_key[r.cell_key] for r in shortlist(screened, a.finalists, sw.spec.slo)]
        log.info("adaptive: %d of %d cells go on to the race: %s", len(finalists), len(screened),
                 ", ".join(c.key for c in finalists))
        missing = [c for c in finalists if c.key not in _done(sw, 1)]
        rows = race.run(sw, missing, rung=1) if missing else []
        sw.raced = rows is not None
        if rows is None:
            _measure_all(sw, missing, rung=1)
        for row in rows or ():
            _record(sw, row)
    else:
        done = _done(sw, 1)
        _measure_all(sw, [c for c in contenders if c.key not in done], rung=1)
    # No defaults cell here: the paired comparison (bench/confirm.py) measures the defaults at the winner's load.
    return [r for r in _done(sw, 1).values() if not r.baseline]


def _measure_all(sw: Sweep, cells: Sequence[Cell], rung: int, *, screen: bool = False) -> None:
    groups: dict[ServerConfig, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.server, []).append(c)
    if screen:  # the lightest load first: it is the cheapest, and screen_drop may spare the others
        groups = {k: sorted(v, key=lambda c: c.client.concurrency) for k, v in groups.items()}
    for index, (server, cells_of) in enumerate(groups.items()):
        sw.stop.check()
        group = _fitting(sw, cells_of, served=None)
        if not group:
            continue
        log_dir = sw.out_dir / "logs" / f"r{rung}-{index:03d}-{measuring.slug(server.key)}"
        with measuring.servers(sw, server, log_dir) as servers:
            if servers.failure is None:
                _count_tokens(sw, servers.urls[0])
                served = fit.served(servers.urls[0])
                group = _fitting(sw, group, served=served.slot_ctx)
                if group:
                    # Adaptive mode warms each slot once; the grid keeps its warm-up per stream.
                    slots = served.slots if sw.spec.mode == "adaptive" else None
                    measuring.warm_up(sw, servers.urls, group, slots)
            for c in group:
                sw.stop.check()
                if screen and (why := _screen_drop(sw, c)) is not None:
                    log.info("skipped %s: %s", c.key, why)
                    sw.pruned.append(Pruned(c, why))
                    continue
                failure = servers.failure or servers.dead()
                result = measuring.failed(sw, c, servers.argv, failure) if failure else \
                    measuring.measure(sw, c, servers, screen=screen)
                result.rung = rung
                _record(sw, result)


def _screen_drop(sw: Sweep, cell: Cell) -> str | None:
    """screen_drop for a cell whose config already screened a load (its lightest; on --resume too)."""
    rows = _done(sw, 0)
    own = [rows[c.key] for c in sw.cells if c.server == cell.server and c.key in rows]
    if not own:
        return None
    first = min(own, key=lambda r: r.concurrency)
    return screen_drop(first, list(rows.values()), sw.spec.adaptive.drop_below)


def _count_tokens(sw: Sweep, url: str) -> None:
    """Count the prompts in the model's tokens on the first server that starts, then refuse the sweep
    at once if no tuned cell can fit (every later start would be wasted)."""
    if sw.tokens is not None:
        return
    sw.tokens = fit.count_prompt_tokens(url, sw.spec.client.prompt_words) or {}
    log.info("prompt tokens per corpus length (chat template included): %s", sw.tokens)
    tuned = [c for c in sw.cells if not c.server.baseline]
    if tuned and all(_unfit(sw, c, None) for c in tuned):
        raise ConfigError(f"bench-profile: no swept config fits its prompts: {_unfit(sw, tuned[0], None)}",
                          hint="raise ctx_size, lower parallel, --prompt-words or --max-tokens")


def _unfit(sw: Sweep, cell: Cell, served: int | None) -> str | None:
    merged = effective(cell.server, sw.profile_values, swept_dims(sw.spec))
    if served is not None:
        why = fit.reason(cell.client.prompt_words, cell.client.max_tokens, served, "as the server reports it",
                         sw.tokens)
        if why:
            return why
    return prune_reason(cell, merged, sw.tokens)


def _fitting(sw: Sweep, cells: Sequence[Cell], served: int | None) -> list[Cell]:
    """The cells whose requests fit their slots; the others are skipped with the reason (in the report)."""
    keep = []
    for cell in cells:
        why = _unfit(sw, cell, served)
        if why is None:
            keep.append(cell)
        elif cell.key not in {p.cell.key for p in sw.pruned}:
            log.info("skipped %s: %s", cell.key, why)
            sw.pruned.append(Pruned(cell, why))
    return keep


def _receipt(sw: Sweep, result: CellResult) -> None:
    """Each measured cell calibrates later plans on this hardware (wrapper plan's forecast band)."""
    from wrapper.plan import receipts

    values = {f"llamacpp.{k}": v for k, v in result.server.items() if k != "instances"}
    cell_settings, _ = sw.settings.with_layer(values, f"bench:{sw.meta.run_id}")
    assert result.decode_tps is not None
    receipts.record_measurement(cell_settings, sw.model_file, result.decode_tps, kind="bench")


def _record(sw: Sweep, result: CellResult) -> None:
    sw.results = [r for r in sw.results if (r.cell_key, r.rung) != (result.cell_key, result.rung)] + [result]
    sw.store.record_cell(sw.meta, result)
    if result.status == "ok" and result.decode_tps and not result.baseline:
        _receipt(sw, result)
    _write_files(sw)
    lo, hi = result.ci
    log.info("cell %s: %s %.1f tok/s (reps %d)", result.cell_key, result.status, result.throughput_tps,
             len(result.reps))
    sw.publish("llama.benchmark.cell.v1", {
        "run_id": sw.meta.run_id, "config": result.server_key, "client": result.client_key, "status": result.status,
        "reason": result.reason, "throughput_tps": result.throughput_tps, "ci_low": lo, "ci_high": hi,
        "tokens": result.tokens, "prompt_tokens": result.prompt_tokens, "requests": result.requests,
        "errors": result.errors, "ttft_p50_ms": result.ttft_p50_ms, "ttft_p95_ms": result.ttft_p95_ms,
        "ttft_p99_ms": result.ttft_p99_ms, "decode_tps": result.decode_tps, "rung": result.rung})


def _all_rows(sw: Sweep) -> list[CellResult]:
    pruned = [measuring.base_result(sw, p.cell, [], "pruned", p.reason) for p in sw.pruned]
    return sorted(sw.results, key=lambda r: r.rung) + pruned


def _write_files(sw: Sweep) -> None:
    write_csv(sw.out_dir / "results.csv", _all_rows(sw), sw.meta)
