"""The report's charts drawn with matplotlib (the optional `report` extra) as inline SVG.

matplotlib is optional so the container does not grow: without it the report falls back to the
hand-drawn SVG in report.py. Each chart has labelled axes with units and ticks matplotlib chooses.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wrapper.tuning.records import CellResult, t95

if TYPE_CHECKING:  # the optional `report` extra; without it the report keeps its plain SVG charts
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plt.rcParams.update({"font.size": 10, "svg.fonttype": "none"})
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _svg(fig: Figure) -> str:
    from matplotlib import pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def throughput(cells: Sequence[CellResult], best_key: str | None) -> str:
    fig, ax = _figure(width=10.5)
    ok = [c for c in cells if c.status == "ok"]
    # One line per config and request shape: points of different prompt lengths are not one curve.
    shapes = sorted({(c.client.get("prompt_words"), c.client.get("max_tokens")) for c in ok}, key=str)
    lines = sorted({(c.server_key, (c.client.get("prompt_words"), c.client.get("max_tokens"))) for c in ok},
                   key=lambda k: (k[0] != "defaults", str(k)))
    for key, shape in lines:
        pts = sorted((c.concurrency, c.throughput_tps, c.ci) for c in ok if c.server_key == key
                     and (c.client.get("prompt_words"), c.client.get("max_tokens")) == shape)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [[max(0.0, y - (p[2][0] if p[2][0] is not None else y)) for p, y in zip(pts, ys, strict=True)],
               [max(0.0, (p[2][1] if p[2][1] is not None else y) - y) for p, y in zip(pts, ys, strict=True)]]
        best = best_key is not None and best_key.startswith(key + "|") and f"p={shape[0]},n={shape[1]}" in best_key
        style: dict[str, Any] = {"linewidth": 3 if best else 1.5, "marker": "o", "capsize": 3}
        if key == "defaults":
            style.update(color="black", linestyle="--" if shape == shapes[0] else ":")
        label = key + (f" p={shape[0]} n={shape[1]}" if len(shapes) > 1 else "") + (" (chosen)" if best else "")
        ax.errorbar(xs, ys, yerr=err, label=label, **style)
    ax.set_xlabel("concurrent streams (closed loop)")
    ax.set_ylabel("throughput (output tok/s)")
    ax.set_ylim(bottom=0)
    xs_all = sorted({c.concurrency for c in ok})
    ax.set_xticks(xs_all)
    # Beside the axes, not over them: a grid of 16 configs has 16 lines.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Throughput vs concurrency, one line per config (bars: 95% CI)")
    return _svg(fig)


def frontier(cells: Sequence[CellResult], line: Sequence[CellResult], best_key: str | None) -> str:
    fig, ax = _figure()
    ok = [c for c in cells if c.status == "ok" and c.latency_p95_ms is not None]
    # Labels only where they answer something (the frontier, the chosen cell, the defaults): a dense cloud
    # of labelled points is unreadable.
    labelled = {c.cell_key for c in line} | {best_key} | {c.cell_key for c in ok if c.baseline}
    for c in ok:
        color = "tab:green" if c.cell_key == best_key else ("black" if c.baseline else "tab:blue")
        ax.scatter(c.throughput_tps, c.latency_p95_ms or 0.0, color=color, s=60 if c.cell_key == best_key else 25,
                   zorder=3)
        if c.cell_key in labelled:
            ax.annotate(f"{c.server_key} c={c.concurrency}", (c.throughput_tps, c.latency_p95_ms or 0), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    pts = sorted(line, key=lambda c: c.throughput_tps)
    ax.plot([c.throughput_tps for c in pts], [c.latency_p95_ms or 0.0 for c in pts], color="tab:red",
            label="frontier")
    ax.set_xlabel("throughput (output tok/s)")
    ax.set_ylabel("p95 request latency (ms)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Latency-throughput frontier (green: chosen, black: llama-server defaults)")
    return _svg(fig)


def gain_rows(cells: Sequence[CellResult]) -> list[tuple[str, float, float, float]]:
    """(cell, gain, low, high) over the defaults cell at the same load, from the sweep's own (unpaired)
    repetitions; on the log scale, so a bound is never below -100%."""
    bases = {c.client_key: c for c in cells if c.baseline and c.status == "ok" and len(c.reps) >= 2}
    out = []
    for c in cells:
        base = bases.get(c.client_key)
        if c.baseline or base is None or c.status != "ok" or len(c.reps) < 2 or min(c.reps + base.reps) <= 0:
            continue
        lc, lb = [math.log(v) for v in c.reps], [math.log(v) for v in base.reps]
        diff = statistics.fmean(lc) - statistics.fmean(lb)
        se = math.sqrt(statistics.variance(lc) / len(lc) + statistics.variance(lb) / len(lb))
        half = t95(min(len(lc), len(lb)) - 1) * se
        out.append((c.cell_key, math.exp(diff) - 1, math.exp(diff - half) - 1, math.exp(diff + half) - 1))
    return out


def gain(cells: Sequence[CellResult], paired: dict[str, Any] | None, best_key: str | None) -> str | None:
    rows = gain_rows(cells)
    if paired and paired.get("gain") is not None and best_key:
        rows.append((f"{best_key} (paired)", paired["gain"], paired.get("gain_low") or paired["gain"],
                     paired.get("gain_high") or paired["gain"]))
    if not rows:
        return None
    fig, ax = _figure(height=max(2.5, 0.35 * len(rows) + 1.2))
    ys = list(range(len(rows)))
    g = [r[1] * 100 for r in rows]
    err = [[g[i] - rows[i][2] * 100 for i in ys], [rows[i][3] * 100 - g[i] for i in ys]]
    colors = ["tab:green" if r[0].startswith(str(best_key)) else "tab:blue" for r in rows]
    ax.barh(ys, g, xerr=err, color=colors, capsize=3, alpha=0.8)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(ys, [r[0].replace("|", "  ") for r in rows], fontsize=7)
    ax.set_xlabel("gain over llama-server defaults at the same load (%, bars: 95% CI)")
    ax.set_title("Gain over defaults")
    return _svg(fig)
