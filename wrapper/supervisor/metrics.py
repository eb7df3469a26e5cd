"""/metrics text: the wrapper's own numbers as gauges, every sample labelled with the instance (profile,
instance, node, model), and llama-server's own `--metrics` read and re-served under the same labels, so one
scrape of the status port tells instances apart (issue 13: the samples had no labels and llama-server's own
metrics were off)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?(\s+.*)$")


def relabel(text: str, labels: dict[str, str]) -> str:
    """Add `labels` to every sample of a Prometheus text exposition (labels a sample already has win)."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line) if line and not line.startswith("#") else None
        if match is None:
            out.append(line)
            continue
        name, own, rest = match.groups()
        have = {part.split("=", 1)[0].strip() for part in (own or "").split(",")}
        add = [f'{k}="{_escape(v)}"' for k, v in labels.items() if k not in have]
        out.append(f"{name}{{{','.join(p for p in (own, *add) if p)}}}{rest}")
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def upstream_reader(url: str, api_key: str | None) -> Callable[[], str]:
    def read() -> str:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        response = httpx.get(f"{url}/metrics", headers=headers, timeout=2.0, trust_env=False)
        response.raise_for_status()
        return response.text

    return read


def numeric(prefix: str, data: dict[str, Any], what: str) -> list[str]:
    """Flatten numbers (and booleans) one level deep into gauges; other values are /status-only."""
    out = []
    for key, value in sorted(data.items()):
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            if isinstance(v, bool | int | float) and not (isinstance(v, float) and math.isnan(v)):
                name = "_".join(p for p in (prefix, key, sub) if p)
                name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
                field = ".".join(p for p in (key, sub) if p)
                out += [f"# HELP {name} {what}: {field}.", f"# TYPE {name} gauge", f"{name} {float(v):g}"]
    return out
