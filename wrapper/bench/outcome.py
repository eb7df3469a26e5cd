"""The end of a sweep: the candidate, its paired comparison with the defaults, the verdict, and what is
kept. Only a verdict of "win" (or a sweep run with --no-baseline, said so in its notes) is stored, applied
by auto-tune and shared with the fleet; "inconclusive" and "defaults" keep nothing and say why."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapper.bench import confirm
from wrapper.bench import report as bench_report
from wrapper.bench.confirm import Verdict
from wrapper.bench.select import Selection, select
from wrapper.bench.spec import Cell, Pruned, swept_dims
from wrapper.tuning.records import CellResult
from wrapper.tuning.store import BelowDefaults, BestConfig, atomic_write_text

if TYPE_CHECKING:
    from wrapper.bench.sweep import Sweep


@dataclass(frozen=True)
class Outcome:
    run_id: str
    out_dir: Path
    selection: Selection
    verdict: Verdict
    final: list[CellResult]
    pruned: list[Pruned]
    files: dict[str, str]
    best_values: dict[str, Any] | None  # what was stored for auto-tune; None when nothing was
    notes: list[str]
    duration_s: float
    summary: dict[str, Any]  # the stable --json shape (also summary.json)


def finish(sw: Sweep, final: list[CellResult], started: float) -> Outcome:
    """`started`: the sweep's monotonic start; its duration includes the paired comparison."""
    from wrapper.bench.sweep import _all_rows, _write_files

    selection = select(final, sw.spec.slo, paired=sw.raced)
    notes: list[str] = []
    verdict = _verdict(sw, selection)
    duration = time.monotonic() - started
    values: dict[str, Any] | None = None
    if selection.best is not None and verdict.stores:
        values, note = _store(sw, selection.best, verdict)
        notes += note
    if verdict.kind == "unchecked":
        notes.append("not compared with llama-server's defaults (--no-baseline): stored as measured, unchecked")
    files = {"csv": str(sw.out_dir / "results.csv"), "jsonl": str(sw.out_dir / "requests.jsonl"),
             "report": str(sw.out_dir / "report.html"), "summary": str(sw.out_dir / "summary.json"),
             "store": str(sw.store.path)}
    _write_files(sw)
    summary = _summary(sw, selection, verdict, values=values, notes=notes, files=files, duration=duration)
    atomic_write_text(Path(files["report"]), bench_report.render(summary, final, _all_rows(sw)))
    atomic_write_text(Path(files["summary"]), json.dumps(summary, indent=2, sort_keys=True, default=str))
    sw.store.finish_run(sw.meta.run_id, "completed", summary)
    sw.publish("llama.benchmark.completed.v1", summary)
    return Outcome(sw.meta.run_id, sw.out_dir, selection, verdict, final, sw.pruned, files, values, notes, duration,
                   summary)


def _cell(sw: Sweep, key: str) -> Cell:
    return next(c for c in sw.cells if c.key == key)


def _verdict(sw: Sweep, sel: Selection) -> Verdict:
    if sel.best is None:
        if sel.baseline is not None:
            return Verdict("defaults", f"no best config: {sel.reason}")
        return Verdict("inconclusive", f"no best config: {sel.reason}",
                       advice="see the rejected cells in the report; relax the SLO or widen the sweep")
    if not sw.spec.baseline:
        return Verdict("unchecked", sel.reason, ratio=None)
    leader = _cell(sw, sel.best.cell_key)
    base = next(c for c in sw.cells if c.server.baseline and c.client.key == leader.client.key)
    return confirm.compare(sw, leader, base)


def _store(sw: Sweep, best: CellResult, verdict: Verdict) -> tuple[dict[str, Any] | None, list[str]]:
    notes: list[str] = []
    server = _cell(sw, best.cell_key).server
    values = server.settings_values(swept_dims(sw.spec))
    if server.instances > 1:
        notes.append(f"the best config runs {server.instances} instances; serve runs one per profile, so only "
                     "its per-server flags are applied by auto-tune")
    paired = bool(verdict.leader_reps)
    record = BestConfig(
        sw.key, sw.meta.run_id, best.cell_key, values,
        statistics.fmean(verdict.leader_reps) if paired else best.throughput_tps,
        statistics.fmean(verdict.defaults_reps) if paired else None, verdict.gain, best.argv, time.time(),
        gain_low=None if verdict.low is None else verdict.low - 1,
        gain_high=None if verdict.high is None else verdict.high - 1)
    try:
        sw.store.record_best(sw.key, record)
    except BelowDefaults as exc:
        return None, [*notes, str(exc)]
    if sw.settings.env.nats_url:
        from wrapper.events.publisher import NatsAccess
        from wrapper.tuning import fleet

        stored = sw.store.best_for(sw.key)
        if stored is not None:
            notes.append(fleet.publish_best(NatsAccess.from_env(sw.settings.env), stored))
    return values, notes


def _summary(sw: Sweep, sel: Selection, verdict: Verdict, *, values: dict[str, Any] | None, notes: list[str],
             files: dict[str, str], duration: float) -> dict[str, Any]:
    cand = sel.best
    candidate = None if cand is None else {
        "config": cand.server_key, "client": cand.client_key,
        "values": _cell(sw, cand.cell_key).server.settings_values(swept_dims(sw.spec)),
        "throughput_tps": cand.throughput_tps, "ci": list(cand.ci), "ttft_p95_ms": cand.ttft_p95_ms,
        "decode_tps": cand.decode_tps, "rss_mb": cand.rss_mb, "argv": cand.argv}
    paired = verdict.as_dict()
    return {
        "run_id": sw.meta.run_id, "profile": sw.key.profile, "model_id": sw.key.model_id,
        "hardware_fingerprint": sw.key.hardware_fp, "build": sw.key.build, "mode": sw.spec.mode,
        # `best` is what was stored for auto-tune: None unless the verdict is a win (or unchecked).
        "best": candidate if values is not None else None, "candidate": candidate,
        "verdict": verdict.kind, "why": verdict.reason, "advice": verdict.advice, "paired": paired,
        "reason": sel.reason, "baseline_tps": sel.baseline.throughput_tps if sel.baseline else None,
        "gain": verdict.gain if verdict.gain is not None else sel.gain,
        "gain_low": paired["gain_low"], "gain_high": paired["gain_high"],
        "tied": list(sel.tied), "slo": sw.spec.slo.model_dump(),
        "cells_measured": len(sw.results), "cells_pruned": len(sw.pruned),
        "skipped": [{"cell": p.cell.key, "reason": p.reason} for p in sw.pruned],
        "prompt_tokens": sw.tokens,
        "cells_failed": sum(r.status in ("failed", "errors") for r in sw.results),
        "duration_s": round(duration, 2), "notes": notes, "files": files,
        "corpus_sha256": sw.meta.corpus_sha256, "seed": sw.meta.seed,
    }
