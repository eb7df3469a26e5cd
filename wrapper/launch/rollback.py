"""What this node learned about tuned configs by running them: which ones it rolled back, and the last one
that passed its start self-check here.

`serve` records a rollback when the self-check of a tuned start lands clearly below the figure bench-profile
recorded (or a fleet config fails this node's check); `prepare` then leaves that run's config out until a
new bench-profile run replaces it. A tuned start whose self-check repeated the tuned cell's load and passed
is remembered per tuning key (the last few, newest first), so that rolling back a config goes to the newest
other one that passed here rather than all the way down to the profile's own (issue 12: "falls back to the
previous config (or the profile's own)"). Two JSON files under the state directory, each replaced atomically
(fsynced) under a lock: instances sharing a state directory do not lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the store (sqlite3, csv) is imported only where a tuned config is in play: not before every exec
    from wrapper.tuning.store import BestConfig, TuningKey


def path_in(state_dir: Path) -> Path:
    return state_dir / "selfcheck" / "rolled_back.json"


def good_path_in(state_dir: Path) -> Path:
    return state_dir / "selfcheck" / "last_good.json"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# How many configs that passed here are remembered per tuning key: enough to step back past one that was itself
# rolled back later, few enough that a long-gone run is not revived.
KEEP_GOOD = 5


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, Any]]:
    """The file's data, for a read-modify-write under an exclusive lock; written back (fsynced) on exit."""
    from wrapper.tuning.store import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _load(path)
        yield data
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def record(state_dir: Path, run_id: str, why: str) -> None:
    with _locked(path_in(state_dir)) as data:
        data[run_id] = {"why": why, "at": _now()}


def rolled_back(state_dir: Path, run_id: str) -> str | None:
    """Why and when `run_id` was rolled back here, in words; None when it never was."""
    return _why(_load(path_in(state_dir)), run_id)


def _why(ledger: dict[str, Any], run_id: str) -> str | None:
    entry = ledger.get(run_id)
    if not isinstance(entry, dict):
        return None
    return f"{entry.get('at', '?')}: {entry.get('why', '?')}"


def _key_name(key: TuningKey) -> str:
    return "|".join((key.profile, key.model_id, key.hardware_fp, key.build))


def record_good(state_dir: Path, tuned: BestConfig, measured: str) -> None:
    """`tuned` passed its start self-check here, at the load its figure was recorded at (`measured`: the
    figure with its unit, in words). It goes first in its key's list; an older entry of the same run goes."""
    entry = {"run_id": tuned.run_id, "values": tuned.values, "measured": measured, "at": _now()}
    with _locked(good_path_in(state_dir)) as data:
        name = _key_name(tuned.key)
        data[name] = [entry, *(e for e in _passed(data.get(name)) if e.get("run_id") != tuned.run_id)][:KEEP_GOOD]


def _passed(found: object) -> list[dict[str, Any]]:
    """A key's entries, newest first (a single entry: the format before the list)."""
    entries = found if isinstance(found, list) else [found]
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("run_id"), str)]


@dataclass(frozen=True)
class Fallback:
    """Where a rolled-back tuned start goes: a stored tuned run, or (run_id None) the profile's own config."""

    run_id: str | None
    why: str  # in words: why this one (for /status, the log and the event)
    best: BestConfig | None = None  # the stored run, as fallback_for checked it (None: the profile's own)

    @property
    def target(self) -> str:
        return f"the previous tuned config {self.run_id}" if self.run_id else "the profile's own config"


def fallback_for(state_dir: Path, rolled: BestConfig) -> Fallback:
    """The newest other tuned config that passed its self-check on this node for `rolled`'s key, is still
    stored, still beats the defaults and was not rolled back itself; else the profile's own config, with why
    the newest candidate could not be used."""
    from wrapper.tuning.store import below_defaults

    candidates = [e for e in _passed(_load(good_path_in(state_dir)).get(_key_name(rolled.key)))
                  if e["run_id"] != rolled.run_id]
    ledger = _load(path_in(state_dir))
    first_miss = None
    for entry in candidates:
        run_id = entry["run_id"]
        last = f"the last tuned config that passed its self-check here, {run_id},"
        if (why := _why(ledger, run_id)) is not None:
            miss = f"{last} was rolled back since ({why})"
        elif (best := stored_run(state_dir, rolled.key, run_id)) is None:
            miss = f"{last} is no longer in the tuning store"
        elif (slower := below_defaults(best)) is not None:
            miss = f"{last} no longer beats the defaults ({slower})"
        else:
            return Fallback(run_id, f"it passed its self-check here at {entry.get('at', '?')} "
                                    f"({entry.get('measured', '?')})", best)
        first_miss = first_miss or miss
    return Fallback(None, first_miss or "no earlier tuned config passed its self-check on this node")


def stored_run(state_dir: Path, key: TuningKey, run_id: str) -> BestConfig | None:
    from wrapper.tuning.store import Store, default_path

    path = default_path(state_dir)
    if not path.is_file():
        return None
    with Store(path) as store:
        return store.best_for(key, run_id)
