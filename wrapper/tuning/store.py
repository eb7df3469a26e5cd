"""Results and tuning store: SQLite for runs, cells and best configs; CSV and JSONL result files.

A best config is keyed by (profile, model identity, hardware fingerprint, llama.cpp build): a config tuned
for one of those says nothing about another. Every cell row carries the full argv, build, model identity,
corpus hash and seed, so a number can always be traced to exactly what produced it. Result files are
written to a temporary name, fsynced and renamed, so a crash never leaves a truncated file behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wrapper.model.files import cached_sha256, sha256_file
from wrapper.tuning.records import CellResult, ClientLoad

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, profile TEXT, model_id TEXT, hardware_fp TEXT, build TEXT, mode TEXT,
    spec_json TEXT, out_dir TEXT, corpus_sha256 TEXT, seed INTEGER, status TEXT,
    started_at REAL, finished_at REAL, summary_json TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    run_id TEXT, cell_key TEXT, rung INTEGER, server_key TEXT, baseline INTEGER, status TEXT, reason TEXT,
    server_json TEXT, client_json TEXT, reps_json TEXT, throughput_tps REAL, ci_low REAL, ci_high REAL,
    tokens INTEGER, requests INTEGER, errors INTEGER,
    ttft_p50_ms REAL, ttft_p95_ms REAL, ttft_p99_ms REAL, latency_p50_ms REAL, latency_p95_ms REAL,
    latency_p99_ms REAL, decode_tps REAL, duration_s REAL, cost_json TEXT, argv_json TEXT,
    build TEXT, model_id TEXT, corpus_sha256 TEXT, seed INTEGER, created_at REAL,
    itl_p50_ms REAL, itl_p95_ms REAL, itl_p99_ms REAL, rss_mb REAL,
    PRIMARY KEY (run_id, cell_key, rung)
);
CREATE TABLE IF NOT EXISTS best (
    id INTEGER PRIMARY KEY AUTOINCREMENT, profile TEXT, model_id TEXT, hardware_fp TEXT, build TEXT,
    run_id TEXT, cell_key TEXT, values_json TEXT, throughput_tps REAL, baseline_tps REAL, gain REAL,
    argv_json TEXT, created_at REAL, gain_low REAL, gain_high REAL
);
CREATE INDEX IF NOT EXISTS best_key ON best (profile, model_id, hardware_fp, build, created_at);
"""

_METRICS = ("ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
            "itl_p50_ms", "itl_p95_ms", "itl_p99_ms", "decode_tps")
# Columns added after the first release: a store written by an older version gains them on open.
_ADDED = {"cells": ("itl_p50_ms REAL", "itl_p95_ms REAL", "itl_p99_ms REAL", "rss_mb REAL"),
          "best": ("gain_low REAL", "gain_high REAL")}
# The dossier's columns first (config, throughput_tps, tokens, errors), then percentiles and the CI.
CSV_COLUMNS = ("config", "client", "status", "reason", "throughput_tps", "ci_low", "ci_high", "reps", "tokens",
               "requests", "errors", *_METRICS, "rss_mb", "duration_s", "rung", "argv", "build", "model_id",
               "corpus_sha256", "seed")


@dataclass(frozen=True)
class TuningKey:
    profile: str
    model_id: str
    hardware_fp: str
    build: str


@dataclass(frozen=True)
class BestConfig:
    key: TuningKey
    run_id: str
    cell_key: str
    values: dict[str, Any]  # setting paths -> values ("llamacpp.parallel": 4)
    throughput_tps: float
    baseline_tps: float | None
    gain: float | None
    argv: list[str]
    created_at: float
    load: ClientLoad | None = None  # the winning cell's client load (from its cell row)
    gain_low: float | None = None  # 95% CI of the gain, from the paired comparison with the defaults
    gain_high: float | None = None


class BelowDefaults(ValueError):
    """A best config whose point estimate is below llama-server's defaults: never stored, applied or shared."""


def below_defaults(best: BestConfig) -> str | None:
    """Why `best` must not be stored, applied or shared (issue 12: a sweep stored, applied and shared
    parallel=1 at -88.9% vs the defaults), or None. A best measured without the defaults passes: the
    sweep's `--no-baseline` said so, and its note says it was not compared."""
    slower = best.baseline_tps is not None and best.throughput_tps < best.baseline_tps
    if slower or (best.gain is not None and best.gain < 0):
        gain = f" ({best.gain * 100:+.1f}%)" if best.gain is not None else ""
        return (f"{best.run_id}: {best.throughput_tps:.1f} tok/s is below llama-server's defaults "
                f"({best.baseline_tps if best.baseline_tps is not None else 0:.1f} tok/s){gain}")
    return None


@dataclass(frozen=True)
class RunMeta:
    run_id: str
    key: TuningKey
    mode: str
    spec_json: str
    out_dir: str
    corpus_sha256: str
    seed: int


def default_path(state_dir: Path) -> Path:
    return state_dir / "tuning.sqlite"


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # One short transaction per write; a Ctrl-C between writes loses nothing already committed.
        self._db = sqlite3.connect(str(path), timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(SCHEMA)
        for table, columns in _ADDED.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db:
            yield self._db

    def begin_run(self, meta: RunMeta) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (run_id, profile, model_id, hardware_fp, build, mode, spec_json, out_dir,"
                " corpus_sha256, seed, status, started_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (meta.run_id, meta.key.profile, meta.key.model_id, meta.key.hardware_fp, meta.key.build, meta.mode,
                 meta.spec_json, meta.out_dir, meta.corpus_sha256, meta.seed, "running", time.time()),
            )
            db.execute("UPDATE runs SET status='running' WHERE run_id=?", (meta.run_id,))

    def run(self, run_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return dict(row) if row else None

    def runs(self, profile: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM runs", tuple[str, ...]()
        if profile:
            sql, args = sql + " WHERE profile=?", (profile,)
        return [dict(r) for r in self._db.execute(sql + " ORDER BY started_at DESC", args)]

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET status=?, finished_at=?, summary_json=? WHERE run_id=?",
                       (status, time.time(), json.dumps(summary, default=str), run_id))

    def record_cell(self, meta: RunMeta, r: CellResult) -> None:
        lo, hi = r.ci
        row = {"run_id": meta.run_id, "cell_key": r.cell_key, "rung": r.rung, "server_key": r.server_key,
               "baseline": int(r.baseline), "status": r.status, "reason": r.reason,
               "server_json": json.dumps(r.server), "client_json": json.dumps(r.client),
               "reps_json": json.dumps(r.reps), "throughput_tps": r.throughput_tps, "ci_low": lo, "ci_high": hi,
               "tokens": r.tokens, "requests": r.requests, "errors": r.errors,
               **{m: getattr(r, m) for m in _METRICS}, "duration_s": r.duration_s, "cost_json": json.dumps(r.cost),
               "argv_json": json.dumps(r.argv), "build": meta.key.build, "model_id": meta.key.model_id,
               "corpus_sha256": meta.corpus_sha256, "seed": meta.seed, "created_at": time.time(),
               "rss_mb": r.rss_mb}
        with self._tx() as db:
            db.execute(f"INSERT OR REPLACE INTO cells ({','.join(row)}) VALUES ({','.join('?' * len(row))})",
                       tuple(row.values()))

    def cells(self, run_id: str) -> list[CellResult]:
        rows = self._db.execute("SELECT * FROM cells WHERE run_id=? ORDER BY created_at", (run_id,))
        return [_cell_from_row(r) for r in rows]

    def record_best(self, key: TuningKey, best: BestConfig) -> None:
        """Keep `best` for auto-tune. Raises BelowDefaults for a config slower than the defaults."""
        if (why := below_defaults(best)) is not None:
            raise BelowDefaults(f"not stored: {why}")
        with self._tx() as db:
            db.execute(
                "INSERT INTO best (profile, model_id, hardware_fp, build, run_id, cell_key, values_json,"
                " throughput_tps, baseline_tps, gain, argv_json, created_at, gain_low, gain_high)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key.profile, key.model_id, key.hardware_fp, key.build, best.run_id, best.cell_key,
                 json.dumps(best.values), best.throughput_tps, best.baseline_tps, best.gain, json.dumps(best.argv),
                 best.created_at, best.gain_low, best.gain_high),
            )

    def best_for(self, key: TuningKey, run_id: str | None = None) -> BestConfig | None:
        """The newest best config recorded for exactly this key; with `run_id`, the one that run recorded (a
        rollback's previous config)."""
        run = " AND run_id=?" if run_id is not None else ""
        row = self._db.execute(
            f"SELECT *, {_CLIENT_OF_BEST} FROM best WHERE profile=? AND model_id=? AND hardware_fp=? AND build=?"
            f"{run} ORDER BY created_at DESC, id DESC LIMIT 1",
            (key.profile, key.model_id, key.hardware_fp, key.build, *((run_id,) if run_id is not None else ())),
        ).fetchone()
        return _best_from_row(row) if row else None

    def bests(self, profile: str | None = None) -> list[BestConfig]:
        """Newest first; every key, so callers can say why a near match was not applied."""
        sql, args = f"SELECT *, {_CLIENT_OF_BEST} FROM best", tuple[str, ...]()
        if profile:
            sql, args = sql + " WHERE profile=?", (profile,)
        return [_best_from_row(r) for r in self._db.execute(sql + " ORDER BY created_at DESC, id DESC", args)]


# The winning cell's client load, read from its own row: one typed value instead of a key string parsed back.
_CLIENT_OF_BEST = ("(SELECT client_json FROM cells WHERE cells.run_id = best.run_id AND cells.cell_key = best.cell_key"
                   " LIMIT 1) AS client_json")


def _best_from_row(row: sqlite3.Row) -> BestConfig:
    key = TuningKey(row["profile"], row["model_id"], row["hardware_fp"], row["build"])
    load = None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        load = ClientLoad.from_dict(json.loads(row["client_json"]))
    return BestConfig(key, row["run_id"], row["cell_key"], json.loads(row["values_json"]), row["throughput_tps"],
                      row["baseline_tps"], row["gain"], json.loads(row["argv_json"]), row["created_at"], load,
                      row["gain_low"], row["gain_high"])


def _cell_from_row(row: sqlite3.Row) -> CellResult:
    return CellResult(
        cell_key=row["cell_key"], server_key=row["server_key"], server=json.loads(row["server_json"]),
        client=json.loads(row["client_json"]), status=row["status"], reason=row["reason"],
        baseline=bool(row["baseline"]), reps=json.loads(row["reps_json"]), requests=row["requests"],
        tokens=row["tokens"], errors=row["errors"], **{m: row[m] for m in _METRICS},
        duration_s=row["duration_s"], cost=tuple(json.loads(row["cost_json"])), rung=row["rung"],
        argv=json.loads(row["argv_json"]), rss_mb=row["rss_mb"],
    )


# ---- identities -------------------------------------------------------------------------------------


def model_identity(path: Path, cache_dir: Path | None = None, declared_sha256: str | None = None) -> str:
    """The model's SHA-256 (declared in the profile and verified by fetch, or computed once and kept in
    the model package's sha256 cache; `cache_dir` holds it when the model folder is read-only).
    `stat:SIZE:MTIME` only when the file cannot be read."""
    if declared_sha256:
        return declared_sha256
    try:
        st = path.stat()
    except OSError:
        return f"missing:{path}"
    try:
        return cached_sha256(path, spare_dir=cache_dir)
    except OSError:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"


def build_id(version: str, binary: str) -> str:
    """llama.cpp build: the version it reports, plus the binary's own hash (dev builds all say `0.0.0-dev`)."""
    try:
        return f"{version}+{sha256_file(Path(binary))[:12]}"
    except OSError:
        return version


# ---- result files -----------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append by copy + rename: readers and crashes only ever see whole files of whole lines."""
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)
    atomic_write_text(path, existing + lines)


def write_csv(path: Path, results: Sequence[CellResult], meta: RunMeta) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in results:
        lo, hi = r.ci
        writer.writerow({
            "config": r.server_key, "client": r.client_key, "status": r.status, "reason": r.reason or "",
            "throughput_tps": _num(r.throughput_tps), "ci_low": _num(lo), "ci_high": _num(hi), "reps": len(r.reps),
            "tokens": r.tokens, "requests": r.requests, "errors": r.errors,
            **{m: _num(getattr(r, m)) for m in _METRICS}, "rss_mb": _num(r.rss_mb),
            "duration_s": _num(r.duration_s), "rung": r.rung,
            "argv": " ".join(r.argv), "build": meta.key.build, "model_id": meta.key.model_id,
            "corpus_sha256": meta.corpus_sha256, "seed": meta.seed,
        })
    atomic_write_text(path, buf.getvalue())


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"
