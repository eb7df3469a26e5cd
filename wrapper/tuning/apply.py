"""Auto-tune: the newest best config recorded for this (profile, model, hardware, llama.cpp build).

Used by `serve.apply_layers` when `tuning.auto: true` or `--auto-tune`. A near match (same profile and
model, but other hardware or another build) is never applied silently: it comes back as a note that says
which run it was and why it does not apply here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from wrapper.errors import ConfigError
from wrapper.settings import Settings
from wrapper.tuning.records import CellResult
from wrapper.tuning.store import BestConfig, RunMeta, Store, TuningKey, below_defaults, default_path

FLEET_PREFIX = "fleet:"  # run ids of configs another node shared, as kept in the local store


def tuning_layer(s: Settings, model_id: str, hardware_fp: str, build: str) -> tuple[dict[str, Any], str, list[str]]:
    """(setting-path values, origin "tuning:<run_id>" or "fleet:<run_id>", notes) for `Settings.with_layer`.

    Empty values (and a note saying why) when nothing matches the key exactly.
    """
    path = default_path(s.env.state_path())
    key = TuningKey(s.profile_name, model_id, hardware_fp, build)
    fleet_note: list[str] = []
    if s.env.nats_url and not _has_local(path, key):
        # Another node with the same hardware fingerprint may have tuned this; keep its answer locally.
        fleet_note = _from_fleet(s, path, key)
    if not path.is_file():
        return {}, "", [*fleet_note, f"auto-tune: no tuning store at {path}; run `wrapper bench-profile` first"]
    with Store(path) as store:
        best = store.best_for(key)
        if best is not None and (slower := below_defaults(best)) is not None:
            # A store written before the guard existed may hold one (issue 12: -88.9% was applied).
            return {}, "", [*fleet_note, f"auto-tune: not applied: {slower}; re-run `wrapper bench-profile`"]
        if best is not None:
            shown = ", ".join(f"{k}={v}" for k, v in best.values.items())
            gain = f", {best.gain * 100:+.1f}% vs defaults" if best.gain is not None else ""
            note = f"auto-tune: applied {best.run_id} ({best.throughput_tps:.1f} tok/s{gain}): {shown}"
            return dict(best.values), origin_of(best), [*fleet_note, note]
        others = [b for b in store.bests(s.profile_name) if b.key.model_id == model_id] or store.bests(s.profile_name)
    if not others:
        return {}, "", [*fleet_note, f"auto-tune: no best config recorded for profile {s.profile_name!r}"]
    near = others[0]
    why = [f"{name} {theirs[:16]} != this {ours[:16]}" for name, theirs, ours in (
        ("model", near.key.model_id, model_id),
        ("hardware fingerprint", near.key.hardware_fp, hardware_fp),
        ("llama.cpp build", near.key.build, build),
    ) if theirs != ours]
    return {}, "", [*fleet_note, f"auto-tune: not applied: the newest best config ({near.run_id}) was tuned "
                    f"for another setup "
                    f"({'; '.join(why)}); re-run `wrapper bench-profile` here"]


def origin_of(best: BestConfig) -> str:
    """`fleet:<run>` for a config another node shared (kept locally under that run id), else `tuning:<run>`."""
    return best.run_id if best.run_id.startswith(FLEET_PREFIX) else f"tuning:{best.run_id}"


def _from_fleet(s: Settings, path: Path, key: TuningKey) -> list[str]:
    """Take the fleet's config for `key` into the local store, if it passes as a profile layer; notes."""
    from wrapper.events.publisher import NatsAccess
    from wrapper.tuning import fleet

    shared, unavailable = fleet.fetch_best(NatsAccess.from_env(s.env), key)
    if shared is None:
        return [f"auto-tune: {unavailable}"] if unavailable else []
    try:  # the whole profile's rules, with these values in it (e.g. ubatch_size <= batch_size)
        s.with_layer(shared.values, f"{FLEET_PREFIX}{shared.run_id}")
    except ConfigError as exc:
        fleet.log.warning("fleet: rejected the shared config %s: %s; not applied, not stored", shared.run_id, exc)
        return [f"auto-tune: fleet: the shared entry {shared.run_id} was rejected"]
    keep_fleet_entry(path, key, shared)
    return [f"auto-tune: {shared.run_id} came from the fleet (JetStream KV {fleet.BUCKET})"]


def keep_fleet_entry(path: Path, key: TuningKey, shared: BestConfig) -> BestConfig:
    """Store a shared best locally as `fleet:<run>`, with a cell row carrying its client load: the store
    reads a best's load from its cell, and without it this node could not re-check the config on start
    (a fleet config is applied only after it passes that check here, issue 12)."""
    kept = replace(shared, run_id=f"{FLEET_PREFIX}{shared.run_id}")
    with Store(path) as store:
        if shared.load is not None:
            load = shared.load
            client = {"concurrency": load.concurrency, "prompt_words": load.prompt_words,
                      "max_tokens": load.max_tokens, "rate": load.rate}
            meta = RunMeta(kept.run_id, key, "fleet", "{}", "-", "-", 0)
            store.record_cell(meta, CellResult(kept.cell_key, kept.cell_key.split("|", 1)[0], dict(kept.values),
                                               client, "fleet", reps=[kept.throughput_tps]))
        store.record_best(key, kept)
    return kept


def _has_local(path: Path, key: TuningKey) -> bool:
    if not path.is_file():
        return False
    with Store(path) as store:
        return store.best_for(key) is not None


def key_for(s: Settings, model_file: Path, sha256: str | None, hardware_fp: str, *, version: str,
            binary: str) -> TuningKey:
    """The tuning key of this start: profile, model hash, hardware fingerprint (of the host as measured once
    by the caller, GPUs as the child sees them) and llama.cpp build."""
    from wrapper.tuning.store import build_id, model_identity

    cache = s.env.state_path() / "cache"
    model_id = model_identity(model_file, cache, sha256 or s.server.sha256)
    return TuningKey(s.profile_name, model_id, hardware_fp, build_id(version, binary))


def selfcheck_load(best: BestConfig) -> dict[str, Any] | None:
    """The self-check settings that repeat the tuned cell's closed-loop load (so its throughput is the
    expected figure), or None when that cell was open-loop or its load is unknown."""
    load = best.load
    if load is None or load.rate is not None:
        return None
    return {"selfcheck.concurrency": load.concurrency, "selfcheck.prompt_tokens": load.prompt_words,
            "selfcheck.max_tokens": load.max_tokens}


def best_applied(s: Settings, key: TuningKey) -> BestConfig | None:
    path = default_path(s.env.state_path())
    if not path.is_file():
        return None
    with Store(path) as store:
        best = store.best_for(key)
    return None if best is None or below_defaults(best) else best


def selfcheck_expectation(s: Settings, best: BestConfig | None) -> tuple[float, str] | None:
    """(expected tok/s, where it came from) when the self-check will run exactly the tuned cell's load."""
    load = selfcheck_load(best) if best is not None else None
    if best is None or load is None:
        return None
    spec = s.profile.selfcheck
    if any(getattr(spec, path.split(".", 1)[1]) != value for path, value in load.items()):
        return None  # an env override changed the self-check's load: the sweep's figure does not apply
    return best.throughput_tps, f"bench-profile {best.run_id}"
