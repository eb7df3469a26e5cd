"""Fleet sharing of best configs: a JetStream key-value bucket, so one tuned node serves its twins.

`bench-profile` puts each best config under its tuning key; `serve --auto-tune` on another node with the
same key (profile, model hash, hardware fingerprint, llama.cpp build) finds it there when its own store has
nothing. Both sides are best effort with a short timeout: no NATS, no JetStream or a slow server only
means a note, never a failed sweep or a delayed start.

The bucket is a remote-configuration channel, so an entry is untrusted input (issue 15: a writer could make
a node drop its API key, bind 0.0.0.0 and add flags, and the entry was then saved locally; a malformed one
gave a traceback on every start). An entry may set only the knobs a sweep varies (`TUNABLE`), each
validated by the profile schema; anything else rejects the whole entry with one warning, and nothing of it
is kept. Lock the bucket down on the server (docs/operations.md, Security).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ValidationError

from wrapper.events.publisher import NatsAccess
from wrapper.profiles.schema import LlamaCppSpec, SelfCheckSpec
from wrapper.tuning.records import ClientLoad
from wrapper.tuning.store import BestConfig, TuningKey, below_defaults

log = logging.getLogger("wrapper.fleet")

BUCKET = "wrapper_tuning"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def kv_key(key: TuningKey) -> str:
    """A JetStream KV key for a tuning key: dots separate the parts, other characters become `_`."""
    return ".".join(_UNSAFE.sub("_", part)[:64] for part in (key.profile, key.model_id, key.hardware_fp, key.build))


# The server knobs a sweep varies (wrapper.bench.spec.SERVER_DIMS, less `instances`, which is not a server
# setting) and the self-check load that repeats the tuned cell. Nothing else: no host, port, key file,
# model or extra_args. tests/test_fleet_hostile.py checks this against SERVER_DIMS.
TUNABLE: dict[str, type[BaseModel]] = {
    **{f"llamacpp.{name}": LlamaCppSpec for name in (
        "parallel", "batch_size", "ubatch_size", "ctx_size", "n_gpu_layers", "n_cpu_moe", "threads",
        "flash_attn", "cache_type_k", "cache_type_v")},
    **{f"selfcheck.{name}": SelfCheckSpec for name in ("concurrency", "prompt_tokens", "max_tokens")},
}
_FIELDS = {"key", "run_id", "cell_key", "values", "throughput_tps", "baseline_tps", "gain", "argv", "created_at",
           "load", "gain_low", "gain_high"}
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,80}$")
_LOAD = {"concurrency", "prompt_words", "max_tokens", "rate"}


class Rejected(ValueError):
    """A bucket entry this node will not use: `field` names the offending key."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


def _encode(best: BestConfig) -> bytes:
    return json.dumps(asdict(best), sort_keys=True).encode()


def decode(raw: bytes) -> BestConfig:
    """A bucket entry as a BestConfig with only tunable values, each as the profile schema validates it.
    Raises Rejected naming the first key that is not acceptable. The entry's argv (display only, never run)
    is dropped, and its time is capped at now, so it cannot outrank a later local sweep."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Rejected("entry", "not valid JSON") from None
    if not isinstance(data, dict):
        raise Rejected("entry", "not a JSON object")
    for name in data:
        if name not in _FIELDS:
            raise Rejected(str(name)[:40], "unknown key")
    key = data.get("key")
    if not isinstance(key, dict) or set(key) != {"profile", "model_id", "hardware_fp", "build"} or not all(
            isinstance(v, str) for v in key.values()):
        raise Rejected("key", "not a tuning key")
    run_id = data.get("run_id")
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise Rejected("run_id", "not a run id (letters, digits, . _ -)")
    cell_key = data.get("cell_key", "")
    if not isinstance(cell_key, str) or len(cell_key) > 200 or not cell_key.isprintable():
        raise Rejected("cell_key", "not a short printable string")
    created = _number(data, "created_at", required=True)
    assert created is not None
    best = BestConfig(
        TuningKey(**key), run_id, cell_key, _values(data.get("values")),
        _number(data, "throughput_tps", required=True) or 0.0, _number(data, "baseline_tps"), _number(data, "gain"),
        [], min(created, time.time()), _load(data.get("load")), _number(data, "gain_low"),
        _number(data, "gain_high"))
    if (why := below_defaults(best)) is not None:
        raise Rejected("throughput_tps", why)
    return best


def _values(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict) or not values:
        raise Rejected("values", "not a non-empty object of setting paths")
    for path in values:
        if path not in TUNABLE:
            raise Rejected(f"values.{str(path)[:60]}", "not a performance knob a sweep can vary")
    out: dict[str, Any] = {}
    for block in {TUNABLE[p] for p in values}:
        mine = {p.split(".", 1)[1]: v for p, v in values.items() if TUNABLE[p] is block}
        # A model source satisfies the spec's own "which model" rule; only the knobs are of interest.
        data = {"model_path": "/fleet-check.gguf", **mine} if block is LlamaCppSpec else mine
        try:
            checked = block.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"][:1]) or next(iter(mine))
            prefix = "llamacpp" if block is LlamaCppSpec else "selfcheck"
            raise Rejected(f"values.{prefix}.{where}", err["msg"].removeprefix("Value error, ")) from None
        out.update({p: getattr(checked, p.split(".", 1)[1]) for p in values if TUNABLE[p] is block})
    return out


def _number(data: dict[str, Any], name: str, *, required: bool = False) -> float | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Rejected(name, "not a finite number")
    return float(value)


def _load(load: Any) -> ClientLoad | None:
    if load is None:
        return None
    if not isinstance(load, dict) or not set(load) <= _LOAD or not {"concurrency", "prompt_words",
                                                                    "max_tokens"} <= set(load):
        raise Rejected("load", "not a client load (concurrency, prompt_words, max_tokens, rate)")
    for name in ("concurrency", "prompt_words", "max_tokens"):
        if isinstance(load[name], bool) or not isinstance(load[name], int) or not 1 <= load[name] <= 1_000_000:
            raise Rejected(f"load.{name}", "not a positive integer")
    rate = _number(load, "rate")
    if rate is not None and rate <= 0:
        raise Rejected("load.rate", "not a positive number")
    return ClientLoad.from_dict(load)


def _access(nats: str | NatsAccess) -> NatsAccess:
    return nats if isinstance(nats, NatsAccess) else NatsAccess(nats)


async def _bucket(access: NatsAccess, timeout_s: float, *, create: bool) -> tuple[Any, Any]:
    import nats
    from nats.js.errors import BucketNotFoundError

    nc = await nats.connect(access.url, **access.options(), connect_timeout=timeout_s, allow_reconnect=False,
                            max_reconnect_attempts=0)
    js = nc.jetstream(timeout=timeout_s)
    try:
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            if not create:  # a reader may be allowed to read the bucket only: never try to make it
                raise
            kv = await js.create_key_value(bucket=BUCKET, history=5, description="wrapper best configs")
    except BaseException:
        await nc.close()  # a server without JetStream: leave no socket behind
        raise
    return nc, kv


def _run(coro: Any, timeout_s: float) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def publish_best(nats: str | NatsAccess, best: BestConfig, timeout_s: float = 5.0) -> str:
    """Put `best` in the fleet bucket; returns a note for the run's summary. A best below the defaults is
    never shared (issue 12: one was, and every twin node applied it)."""
    if (why := below_defaults(best)) is not None:
        return f"fleet: best config not shared: {why}"

    async def put() -> None:
        nc, kv = await _bucket(_access(nats), timeout_s, create=True)
        try:
            await kv.put(kv_key(best.key), _encode(best))
        finally:
            await nc.close()

    try:
        _run(put(), timeout_s * 2)
    except Exception as exc:  # NATS down, no JetStream, timeout: sharing is optional
        return f"fleet: best config not shared ({type(exc).__name__}: {exc or 'no answer'})"
    return f"fleet: best config shared in JetStream KV {BUCKET}/{kv_key(best.key)}"


def fetch_best(nats: str | NatsAccess, key: TuningKey, timeout_s: float = 3.0) -> tuple[BestConfig | None, str | None]:
    """The fleet's best config for exactly `key`, or (None, why not) — never raises. A rejected entry is
    one warning naming the offending key."""
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError

    async def get() -> bytes | None:
        try:
            nc, kv = await _bucket(_access(nats), timeout_s, create=False)
        except BucketNotFoundError:
            return None
        try:
            entry = await kv.get(kv_key(key))
        except KeyNotFoundError:
            return None
        finally:
            await nc.close()
        return bytes(entry.value) if entry.value else None

    try:
        raw = _run(get(), timeout_s * 2)
    except Exception as exc:
        return None, f"fleet: not consulted ({type(exc).__name__}: {exc or 'no answer'})"
    try:
        best = decode(raw) if raw is not None else None
    except Rejected as exc:
        log.warning("fleet: rejected the shared config %s/%s at %s: %s; not applied, not stored", BUCKET,
                    kv_key(key), exc.field, str(exc).partition(": ")[2])
        return None, f"fleet: the shared entry was rejected ({exc.field})"
    if best is not None and best.key != key:  # a sanitised key collision: never apply another setup's config
        return None, "fleet: the shared entry is for another setup"
    return best, None if best is not None else "fleet: no shared best config for this setup"
