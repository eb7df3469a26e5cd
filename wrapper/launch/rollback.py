"""Tuned configs this node rolled back: kept so a restart does not start the same slow config again.

`serve` records one here when the self-check of a tuned start lands clearly below the figure bench-profile
recorded (or a fleet config fails this node's check); `prepare` then leaves that run's config out until a
new bench-profile run replaces it. One JSON file under the state directory, replaced atomically.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def path_in(state_dir: Path) -> Path:
    return state_dir / "selfcheck" / "rolled_back.json"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(state_dir: Path, run_id: str, why: str) -> None:
    path = path_in(state_dir)
    data = _load(path)
    data[run_id] = {"why": why, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def rolled_back(state_dir: Path, run_id: str) -> str | None:
    """Why and when `run_id` was rolled back here, in words; None when it never was."""
    entry = _load(path_in(state_dir)).get(run_id)
    if not isinstance(entry, dict):
        return None
    return f"{entry.get('at', '?')}: {entry.get('why', '?')}"
