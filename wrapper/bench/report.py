"""The HTML report of one sweep: the answer first, then two inline SVG charts and every cell.

No JavaScript and no external assets, so the file opens anywhere (a CI artifact, an air-gapped box).
Charts: throughput vs concurrency (one line per server config) and the latency-throughput frontier
(each measured cell; the Pareto-optimal ones joined).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

from wrapper.tuning.records import CellResult

_W, _H, _PAD = 640, 360, 52
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _esc(v: object) -> str:
    return html.escape(str(v))


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(x_label: str, y_label: str, xs: Sequence[float], ys: Sequence[float]) -> list[str]:
    out = [f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 10}" y2="{_H - _PAD}" stroke="#333"/>',
           f'<line x1="{_PAD}" y1="10" x2="{_PAD}" y2="{_H - _PAD}" stroke="#333"/>',
           f'<text x="{_W / 2}" y="{_H - 10}" text-anchor="middle" font-size="12">{_esc(x_label)}</text>',
           f'<text x="14" y="{_H / 2}" text-anchor="middle" font-size="12" '
           f'transform="rotate(-90 14 {_H / 2})">{_esc(y_label)}</text>']
    for v, px in _ticks(xs, _PAD, _W - 10):
        out.append(f'<text x="{px:.1f}" y="{_H - _PAD + 16}" text-anchor="middle" font-size="10">{v:g}</text>')
    for v, py in _ticks(ys, _H - _PAD, 10):
        out.append(f'<text x="{_PAD - 6}" y="{py + 3:.1f}" text-anchor="end" font-size="10">{v:.4g}</text>')
    return out


def _ticks(values: Sequence[float], a: float, b: float) -> list[tuple[float, float]]:
    lo, hi = min(values), max(values)
    f = _scale(lo, hi, a, b)
    steps = 4 if hi > lo else 0
    return [(lo + (hi - lo) * i / 4, f(lo + (hi - lo) * i / 4)) for i in range(steps + 1)]


def _svg(body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
            f'aria-label="{_esc(title)}"><title>{_esc(title)}</title>{"".join(body)}</svg>')


def throughput_chart(cells: Sequence[CellResult], best_key: str | None) -> str:
    ok = [c for c in cells if c.status == "ok"]
    if not ok:
        return "<p>No measured cells.</p>"
    xs = [float(c.concurrency) for c in ok]
    ys = [0.0] + [c.throughput_tps for c in ok]
    fx, fy = _scale(min(xs), max(xs), _PAD + 10, _W - 30), _scale(0, max(ys), _H - _PAD, 20)
    body = _axes("concurrent streams", "throughput (tok/s)", xs, ys)
    configs = sorted({c.server_key for c in ok})
    for i, key in enumerate(configs):
        color = _COLORS[i % len(_COLORS)]
        pts = sorted((c.concurrency, c.throughput_tps) for c in ok if c.server_key == key)
        path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in pts)
        width = 3 if best_key and best_key.startswith(key + "|") else 1.5
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width}"/>')
        body += [f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{color}"><title>{_esc(key)}: '
                 f'{y:.1f} tok/s at {x}</title></circle>' for x, y in pts]
        body.append(f'<text x="{_W - 150}" y="{20 + 13 * i}" font-size="10" fill="{color}">{_esc(key)[:28]}</text>')
    return _svg(body, "throughput vs concurrency")


def frontier(cells: Sequence[CellResult]) -> list[CellResult]:
    """Pareto-optimal cells: no other cell has both more throughput and lower p95 latency."""
    pts = sorted((c for c in cells if c.status == "ok" and c.latency_p95_ms is not None),
                 key=lambda c: (-c.throughput_tps, c.latency_p95_ms or 0))
    out: list[CellResult] = []
    for c in pts:
        if not out or (c.latency_p95_ms or 0) < (out[-1].latency_p95_ms or 0):
            out.append(c)
    return out


def frontier_chart(cells: Sequence[CellResult], best_key: str | None) -> str:
    ok = [c for c in cells if c.status == "ok" and c.latency_p95_ms is not None]
    if not ok:
        return "<p>No measured cells.</p>"
    xs = [0.0] + [c.throughput_tps for c in ok]
    ys = [0.0] + [c.latency_p95_ms or 0 for c in ok]
    fx, fy = _scale(0, max(xs), _PAD + 10, _W - 30), _scale(0, max(ys), _H - _PAD, 20)
    body = _axes("throughput (tok/s)", "p95 request latency (ms)", xs, ys)
    line = sorted(frontier(ok), key=lambda c: c.throughput_tps)
    body.append('<polyline points="' + " ".join(f"{fx(c.throughput_tps):.1f},{fy(c.latency_p95_ms or 0):.1f}"
                                                 for c in line) + '" fill="none" stroke="#d62728"/>')
    for c in ok:
        best = c.cell_key == best_key
        fill = "#2ca02c" if best else ("#999" if c.baseline else "#1f77b4")
        body.append(f'<circle cx="{fx(c.throughput_tps):.1f}" cy="{fy(c.latency_p95_ms or 0):.1f}" '
                    f'r="{6 if best else 3.5}" fill="{fill}"><title>{_esc(c.cell_key)}: {c.throughput_tps:.1f} '
                    f'tok/s, p95 {c.latency_p95_ms:.0f} ms</title></circle>')
    return _svg(body, "latency-throughput frontier")


def _fmt(v: object, digits: int = 1) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else _esc(v)


def _table(rows: Sequence[CellResult]) -> str:
    head = ("config", "client", "status", "tok/s", "95% CI", "reps", "TTFT p95 ms", "latency p95 ms",
            "ITL p50/p95/p99 ms", "decode tok/s/stream", "RSS MB", "errors", "rung", "reason")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        lo, hi = r.ci
        ci = f"{lo:.1f}-{hi:.1f}" if lo is not None and hi is not None else ""
        itl = "/".join(_fmt(v, 0) for v in (r.itl_p50_ms, r.itl_p95_ms, r.itl_p99_ms)) if r.itl_p50_ms else ""
        cells = (r.server_key, r.client_key, r.status, _fmt(r.throughput_tps), ci, len(r.reps), _fmt(r.ttft_p95_ms, 0),
                 _fmt(r.latency_p95_ms, 0), itl, _fmt(r.decode_tps), _fmt(r.rss_mb, 0), r.errors, r.rung,
                 r.reason or "")
        out.append(f'<tr class="{_esc(r.status)}">' + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:+.1f}%"


def _answer(summary: dict[str, Any]) -> str:
    """What to run, how much faster than the defaults and how sure, in the first lines of the page."""
    verdict, best, cand = summary.get("verdict"), summary.get("best"), summary.get("candidate")
    gain = summary.get("gain")
    band = (f" (95% CI {_pct(summary.get('gain_low'))} to {_pct(summary.get('gain_high'))})"
            if summary.get("gain_low") is not None else "")
    if best:
        values = " ".join(f"{k}={v}" for k, v in (best.get("values") or {}).items())
        head = (f"<p class=answer>Run <b>{_esc(best['config'])}</b>: <b>{_pct(gain)}</b> vs llama-server's "
                f"defaults{band} at {_esc(best['client'])}.</p>"
                f"<p>Stored for <code>wrapper serve --auto-tune</code> ({_esc(values)}); verdict "
                f"<b>{_esc(verdict)}</b>: {_esc(summary.get('why'))}</p>"
                f"<pre>{_esc(' '.join(best.get('argv') or []))}</pre>")
        return f'<div class="box win">{head}</div>'
    what = {"defaults": "Keep llama-server's defaults", "inconclusive": "Inconclusive: nothing stored"}
    head = f"<p class=answer><b>{_esc(what.get(str(verdict), str(verdict)))}</b>.</p><p>{_esc(summary.get('why'))}</p>"
    if cand:
        head += f"<p>Candidate was {_esc(cand['config'])} at {_esc(cand['client'])}: {_pct(gain)}{band}.</p>"
    if summary.get("advice"):
        head += f"<p>What to try: {_esc(summary['advice'])}</p>"
    return f'<div class="box other">{head}</div>'


def _skipped(summary: dict[str, Any]) -> str:
    skipped = summary.get("skipped") or []
    if not skipped:
        return "<p>None: every planned cell was run.</p>"
    return "<ul>" + "".join(f"<li><b>{_esc(s['cell'])}</b>: {_esc(s['reason'])}</li>" for s in skipped) + "</ul>"


def render(summary: dict[str, Any], final: Sequence[CellResult], rows: Sequence[CellResult]) -> str:
    from wrapper.bench import plots

    cand = summary.get("candidate")
    best_key = f"{cand['config']}|{cand['client']}" if cand else None
    notes = "".join(f"<li>{_esc(n)}</li>" for n in summary.get("notes", []))
    meta = ", ".join(f"{k}: {_esc(summary.get(k))}" for k in ("profile", "model_id", "hardware_fingerprint", "build",
                                                              "mode", "duration_s", "seed", "prompt_tokens"))
    if plots.available():
        charts = (f"<h2>Throughput vs concurrency</h2>{plots.throughput(final, best_key)}"
                  f"<h2>Latency-throughput frontier</h2>{plots.frontier(final, frontier(final), best_key)}")
        gain_chart = plots.gain(final, summary.get("paired"), best_key)
        charts += f"<h2>Gain over llama-server defaults</h2>{gain_chart}" if gain_chart else ""
    else:
        charts = (f"<p><small>Install the <code>report</code> extra (matplotlib) for richer charts.</small></p>"
                  f"<h2>Throughput vs concurrency</h2>{throughput_chart(final, best_key)}"
                  f"<h2>Latency-throughput frontier</h2>{frontier_chart(final, best_key)}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>bench {_esc(summary['run_id'])}</title>
<style>body{{font:14px sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}.answer{{font-size:18px;margin:0.3em 0}}
tr.failed,tr.errors{{background:#fdd}}
tr.pruned{{color:#888}}pre{{white-space:pre-wrap;background:#f4f4f4;padding:6px}}
.box{{padding:0.5em 1em;border-radius:6px;margin-bottom:1em}}.win{{background:#e8f6e8}}.other{{background:#fff4e0}}
svg{{max-width:100%;height:auto}}</style></head><body>
<h1>Sweep {_esc(summary['run_id'])}</h1>{_answer(summary)}
<h2>Skipped cells</h2>{_skipped(summary)}<ul>{notes}</ul><p><small>{meta}</small></p>
{charts}
<h2>Every cell</h2>{_table(rows)}</body></html>
"""
