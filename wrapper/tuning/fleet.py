"""Fleet sharing of best configs: a JetStream key-value bucket, so one tuned node serves its twins.

`bench-profile` puts each best config under its tuning key; `serve --auto-tune` on another node with the
same key (profile, model hash, hardware fingerprint, llama.cpp build) finds it there when its own store has
nothing. Both sides are best effort with a short timeout: no NATS, no JetStream or a slow server only
means a note, never a failed sweep or a delayed start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import asdict
from typing import Any

from wrapper.tuning.records import ClientLoad
from wrapper.tuning.store import BestConfig, TuningKey

log = logging.getLogger("wrapper.fleet")

BUCKET = "wrapper_tuning"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def kv_key(key: TuningKey) -> str:
    """A JetStream KV key for a tuning key: dots separate the parts, other characters become `_`."""
    return ".".join(_UNSAFE.sub("_", part)[:64] for part in (key.profile, key.model_id, key.hardware_fp, key.build))


def _encode(best: BestConfig) -> bytes:
    return json.dumps(asdict(best), sort_keys=True).encode()


def _decode(raw: bytes) -> BestConfig:
    data = json.loads(raw)
    data["key"] = TuningKey(**data["key"])
    data["load"] = ClientLoad.from_dict(data["load"]) if data.get("load") else None
    return BestConfig(**data)


async def _bucket(url: str, timeout_s: float) -> tuple[Any, Any]:
    import nats
    from nats.js.errors import BucketNotFoundError

    nc = await nats.connect(url, connect_timeout=timeout_s, allow_reconnect=False, max_reconnect_attempts=0)
    js = nc.jetstream(timeout=timeout_s)
    try:
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=BUCKET, history=5, description="wrapper best configs")
    except BaseException:
        await nc.close()  # a server without JetStream: leave no socket behind
        raise
    return nc, kv


def _run(coro: Any, timeout_s: float) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def publish_best(url: str, best: BestConfig, timeout_s: float = 5.0) -> str:
    """Put `best` in the fleet bucket; returns a note for the run's summary."""

    async def put() -> None:
        nc, kv = await _bucket(url, timeout_s)
        try:
            await kv.put(kv_key(best.key), _encode(best))
        finally:
            await nc.close()

    try:
        _run(put(), timeout_s * 2)
    except Exception as exc:  # NATS down, no JetStream, timeout: sharing is optional
        return f"fleet: best config not shared ({type(exc).__name__}: {exc or 'no answer'})"
    return f"fleet: best config shared in JetStream KV {BUCKET}/{kv_key(best.key)}"


def fetch_best(url: str, key: TuningKey, timeout_s: float = 3.0) -> tuple[BestConfig | None, str | None]:
    """The fleet's best config for exactly `key`, or (None, why not) — never raises."""
    from nats.js.errors import KeyNotFoundError

    async def get() -> BestConfig | None:
        nc, kv = await _bucket(url, timeout_s)
        try:
            entry = await kv.get(kv_key(key))
        except KeyNotFoundError:
            return None
        finally:
            await nc.close()
        return _decode(entry.value) if entry.value else None

    try:
        best = _run(get(), timeout_s * 2)
    except Exception as exc:
        return None, f"fleet: not consulted ({type(exc).__name__}: {exc or 'no answer'})"
    if best is not None and best.key != key:  # a sanitised key collision: never apply another setup's config
        return None, "fleet: the shared entry is for another setup"
    return best, None if best is not None else "fleet: no shared best config for this setup"
