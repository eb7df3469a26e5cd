"""Client load for one measurement of a sweep: split across a config's instances, cancellable, and the
memory the servers held while serving it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from wrapper.bench.servers import ServerGroup
from wrapper.bench.signals import Stopped, StopRequest
from wrapper.bench.spec import ClientPoint
from wrapper.measure import loadgen


def run(urls: Sequence[str], client: ClientPoint, requests: int, seed: int, *, timeout_s: float,
        stop: StopRequest, max_tokens: int | None = None) -> list[loadgen.RequestResult]:
    """Split the load across instances (like a round-robin balancer would) and run it as one measurement.
    A requested stop cancels the requests in flight and raises Stopped: a cell can run for minutes."""
    k = len(urls)
    specs = []
    for i, url in enumerate(urls):
        share = requests // k + (i < requests % k)
        streams = max(1, client.concurrency // k + (i < client.concurrency % k))
        if share:
            specs.append(loadgen.LoadSpec(
                url=url, requests=share, concurrency=streams, rate=client.rate / k if client.rate else None,
                max_tokens=max_tokens or client.max_tokens, prompt_words=client.prompt_words, seed=seed * 1009 + i,
                timeout_s=timeout_s))

    async def all_instances() -> list[loadgen.RequestResult] | None:
        work = asyncio.gather(*(loadgen.run_async(s) for s in specs))
        # The signal handler only records; this poll is what turns the record into a cancel.
        while not work.done() and not stop.requested:
            await asyncio.wait({work}, timeout=0.1)
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return None
        return [r for part in work.result() for r in part]

    results = asyncio.run(all_instances())
    if results is None:
        raise Stopped(stop.name)
    return results


def transient(results: Sequence[loadgen.RequestResult]) -> bool:
    errors = [r.error for r in results if r.error]
    return bool(errors) and all(e.startswith(("RemoteProtocolError", "ReadError", "ConnectError")) for e in errors)


def rss_mb(servers: ServerGroup) -> float | None:
    """Resident memory of all the config's servers right after serving a load: the measured part of
    "cheaper" (GPU memory is not in it; on a GPU the planner's memory map says more)."""
    total = 0
    for inst in servers.instances:
        pid = inst.child.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), None)
        if line is None:
            return None
        total += int(line.split()[1])  # kB
    return round(total / 1024, 1) if servers.instances else None
