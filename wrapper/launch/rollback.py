"""What this node learned about tuned configs by running them: which ones it rolled back, and the last one
that passed its start self-check here.

`serve` records a rollback when the self-check of a tuned start lands clearly below the figure bench-profile
recorded (or a fleet config fails this node's check); `prepare` then leaves that run's config out until a
new bench-profile run replaces it. A tuned start whose self-check repeated the tuned cell's load and passed
is remembered per tuning key, so that rolling back a newer config goes to it rather than all the way down to
the profile's own (issue 12: "falls back to the previous config (or the profile's own)"). Two JSON files
under the state directory, each replaced atomically.
"""

from __future__ import annotations

import json
import os
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


def _update(path: Path, name: str, entry: dict[str, Any]) -> None:
    data = _load(path)
    data[name] = {**entry, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def record(state_dir: Path, run_id: str, why: str) -> None:
    _update(path_in(state_dir), run_id, {"why": why})


def rolled_back(state_dir: Path, run_id: str) -> str | None:
    """Why and when `run_id` was rolled back here, in words; None when it never was."""
    entry = _load(path_in(state_dir)).get(run_id)
    if not isinstance(entry, dict):
        return None
    return f"{entry.get('at', '?')}: {entry.get('why', '?')}"


def _key_name(key: TuningKey) -> str:
    return "|".join((key.profile, key.model_id, key.hardware_fp, key.build))


def record_good(state_dir: Path, tuned: BestConfig, measured: str) -> None:
    """`tuned` passed its start self-check here, at the load its figure was recorded at (`measured`: the
    figure with its unit, in words)."""
    _update(good_path_in(state_dir), _key_name(tuned.key),
            {"run_id": tuned.run_id, "values": tuned.values, "measured": measured})


@dataclass(frozen=True)
class Fallback:
    """Where a rolled-back tuned start goes: a stored tuned run, or (run_id None) the profile's own config."""

    run_id: str | None
    why: str  # in words: why this one (for /status, the log and the event)

    @property
    def target(self) -> str:
        return f"the previous tuned config {self.run_id}" if self.run_id else "the profile's own config"


def fallback_for(state_dir: Path, rolled: BestConfig) -> Fallback:
    """The last tuned config that passed its self-check on this node for `rolled`'s key, if it is still stored,
    still beats the defaults and was not rolled back itself; else the profile's own config."""
    found = _load(good_path_in(state_dir)).get(_key_name(rolled.key))
    entry: dict[str, Any] = found if isinstance(found, dict) else {}
    run_id = entry.get("run_id")
    if not isinstance(run_id, str) or run_id == rolled.run_id:
        return Fallback(None, "no earlier tuned config passed its self-check on this node")
    last = f"the last tuned config that passed its self-check here, {run_id},"
    if (why := rolled_back(state_dir, run_id)) is not None:
        return Fallback(None, f"{last} was rolled back since ({why})")
    best = stored_run(state_dir, rolled.key, run_id)
    if best is None:
        return Fallback(None, f"{last} is no longer in the tuning store")
    from wrapper.tuning.store import below_defaults

    if (slower := below_defaults(best)) is not None:
        return Fallback(None, f"{last} no longer beats the defaults ({slower})")
    return Fallback(run_id, f"it passed its self-check here at {entry.get('at', '?')} "
                            f"({entry.get('measured', '?')})")


def stored_run(state_dir: Path, key: TuningKey, run_id: str) -> BestConfig | None:
    from wrapper.tuning.store import Store, default_path

    path = default_path(state_dir)
    if not path.is_file():
        return None
    with Store(path) as store:
        return store.best_of_run(key, run_id)
