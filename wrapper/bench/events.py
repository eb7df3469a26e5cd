"""Benchmark events: the sweep's progress as versioned payloads (llama.benchmark.*.v1) on the event sink."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from wrapper.bench.sweep import Publish, _no_events
from wrapper.events import payloads as events
from wrapper.events.payloads import EventContext
from wrapper.plan import hardware
from wrapper.settings import Settings

if TYPE_CHECKING:
    from wrapper.events.publisher import Publisher


def publisher_for(s: Settings) -> tuple[Publish, Publisher | None]:
    """Map the sweep's payloads onto the versioned event models (no-op without NATS_URL)."""
    if not s.env.nats_url:
        return _no_events, None
    from wrapper.events.publisher import NatsAccess, Publisher

    hw = hardware.for_settings(s)
    ctx = EventContext(instance_id=s.env.instance_id or f"{socket.gethostname()}-{s.profile_name}",
                       host=socket.gethostname(), profile=s.profile_name, hardware=hardware.event_summary(hw))
    pub = Publisher(NatsAccess.from_env(s.env), context=ctx)
    index = iter(range(1_000_000))

    def publish(subject: str, p: dict[str, Any]) -> None:
        if subject == events.BenchmarkStarted.SUBJECT:
            grid = {k: v for k, v in p["spec"]["server"].items() if v is not None}
            grid.update({k: v for k, v in p["spec"]["client"].items() if v is not None})
            event: events.Event = ctx.make(events.BenchmarkStarted, run_id=p["run_id"], grid=grid, cells=p["cells"],
                                                          started_at=datetime.now(UTC))
        elif subject == events.BenchmarkCell.SUBJECT:
            config = {"config": p["config"], "client": p["client"], "status": p["status"], "rung": p["rung"]}
            event = ctx.make(events.BenchmarkCell, run_id=p["run_id"], index=next(index), config=config,
                                         throughput_tps=p["throughput_tps"], requests=p["requests"],
                                         errors=p["errors"], prompt_tokens=p["prompt_tokens"],
                                         completion_tokens=p["tokens"], ttft_p50_ms=p["ttft_p50_ms"],
                                         ttft_p99_ms=p["ttft_p99_ms"], decode_tps=p["decode_tps"])
        else:
            best = p["best"]
            event = ctx.make(
                events.BenchmarkCompleted, run_id=p["run_id"], cells=p["cells_measured"],
                failed_cells=p["cells_failed"],
                best_config=dict(best["values"] or {}, config=best["config"]) if best else None,
                best_throughput_tps=best["throughput_tps"] if best else None, results_path=p["files"]["csv"],
                duration_s=p["duration_s"])
        pub.publish(subject, event)

    return publish, pub
