"""What a sweep measures: server and client dimensions, the SLO, repetition rules, and pruning.

A sweep spec comes from a YAML file or from CLI lists; both go through the same pydantic model, so a typo
(`paralel:`) is an error with its path, never a silently ignored dimension. The server configs are the
cartesian product of the server dimensions; each is measured at every client point (concurrency x prompt
length x output length). Configs that cannot work are pruned with the reason, before anything starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wrapper.bench import fit
from wrapper.errors import ConfigError, ConfigErrors
from wrapper.profiles.schema import CacheType, FlashAttn

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]

# Server dimensions map 1:1 onto `llamacpp.<name>` settings, except `instances` (how many servers).
SERVER_DIMS = (
    "instances", "parallel", "batch_size", "ubatch_size", "ctx_size", "n_gpu_layers", "n_cpu_moe",
    "flash_attn", "cache_type_k", "cache_type_v", "threads",
)
# Order in which a config counts as "cheaper" when two are statistically tied: fewer servers first,
# then less KV memory (slots x context), fewer threads, smaller batches, fewer offloaded layers.
_COST_ORDER = ("instances", "kv_cells", "threads", "batch_size", "ubatch_size", "n_gpu_layers")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerDims(_Strict):
    instances: list[Positive] = Field(default_factory=lambda: [1])
    parallel: list[Positive] | None = None
    batch_size: list[Positive] | None = None
    ubatch_size: list[Positive] | None = None
    ctx_size: list[NonNegative] | None = None
    n_gpu_layers: list[NonNegative] | None = None
    n_cpu_moe: list[NonNegative] | None = None
    flash_attn: list[FlashAttn] | None = None
    cache_type_k: list[CacheType] | None = None
    cache_type_v: list[CacheType] | None = None
    threads: list[Positive] | None = None


class ClientDims(_Strict):
    concurrency: list[Positive] = Field(default_factory=lambda: [1, 4])
    # Open loop instead: Poisson arrivals per second (replaces concurrency when set).
    rate: list[Annotated[float, Field(gt=0)]] | None = None
    prompt_words: list[Positive] = Field(default_factory=lambda: [64])
    max_tokens: list[Positive] = Field(default_factory=lambda: [32])


class Slo(_Strict):
    """A config only wins if every stream stays usable: first token soon enough, and decoding fast enough."""

    ttft_p95_ms: Annotated[float, Field(gt=0)] = 2000.0
    min_decode_tps: Annotated[float, Field(ge=0)] = 5.0  # per stream, median over requests


class Repeat(_Strict):
    requests: Positive = 16  # per repetition (per instance group); the run's length scales with concurrency
    min_reps: Annotated[int, Field(ge=1)] = 3
    max_reps: Positive = 6
    ci_rel: Annotated[float, Field(gt=0, lt=1)] = 0.05  # stop once the 95% CI half-width <= this x mean
    warmup_requests: NonNegative = 1
    request_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    start_timeout_s: Annotated[float, Field(gt=0)] = 60.0


class Confirm(_Strict):
    """The paired comparison of the chosen config with llama-server's defaults (interleaved D L D L D runs)."""

    min_pairs: Annotated[int, Field(ge=2)] = 3
    max_pairs: Positive = 30
    budget_s: Annotated[float, Field(gt=0)] = 180.0  # then the verdict is "inconclusive"
    min_gain: Annotated[float, Field(ge=0)] = 0.0  # the ratio's CI must clear 1 + this to win


class Adaptive(_Strict):
    """Screen every cell with one short run, then race a shortlist side by side (bench/race.py)."""

    first_requests: Positive = 4  # requests per cell in the screen, rounded up to whole waves, at least two
    finalists: Positive = 3  # the screen's fastest configs that race (plus the one the others rate highest)
    rounds: Annotated[int, Field(ge=2)] = 3  # race rounds: each finalist runs once a round, order rotated
    # Then the two leaders race on alone for this many rounds (select.race_leaders): the top configs are
    # often within the noise of a few rounds, and that is the choice the rounds are worth spending on.
    final_rounds: Annotated[int, Field(ge=0)] = 3
    # A config whose first (lightest) load screens below this share of the fastest cell screened there so far
    # skips its other loads in the screen (select.screen_drop); 0 screens every cell.
    drop_below: Annotated[float, Field(ge=0, lt=1)] = 0.7
    # Requests per finalist and round; unset: a grid repetition's (repeat.requests, at least two per stream).
    race_requests: Positive | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_eta(cls, data: object) -> object:
        # Runs recorded before the race kept `adaptive.eta` in run.json (grid runs too: the whole spec is saved);
        # --resume of a grid run must still read its spec. An adaptive one is refused (bench/sweep.py).
        if isinstance(data, dict) and "eta" in data:
            data = {k: v for k, v in data.items() if k != "eta"}
        return data


class SweepSpec(_Strict):
    server: ServerDims = Field(default_factory=ServerDims)
    client: ClientDims = Field(default_factory=ClientDims)
    slo: Slo = Field(default_factory=Slo)
    repeat: Repeat = Field(default_factory=Repeat)
    adaptive: Adaptive = Field(default_factory=Adaptive)
    confirm: Confirm = Field(default_factory=Confirm)
    mode: Literal["grid", "adaptive"] = "grid"
    # Also measure the profile with every swept knob left to llama-server's own default, in the same run,
    # so the best config's gain is stated against what an untuned start gives on this machine.
    baseline: bool = True
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def grid_requests(repeat: Repeat, concurrency: int) -> int:
    """Requests in one grid repetition: `repeat.requests`, and at least two per stream."""
    return max(repeat.requests, 2 * concurrency)


def screen_requests(adaptive: Adaptive, concurrency: int) -> int:
    """Requests in a cell's one screen run: whole waves (the same number per stream), at least two.

    One wave measured a config's start-up and tail more than its steady state: a single wave of 4 rated
    parallel=1 cells up to 35% above the grid's 16-request figure, and one of 8 at concurrency 8 rated
    parallel=4 cells up to 30% below it, which kept the grid's best out of the race."""
    waves = max(2, -(-adaptive.first_requests // concurrency))
    return waves * concurrency


def race_requests(spec: SweepSpec, concurrency: int) -> int:
    """Requests per finalist and race round: by default a grid repetition's, so a round measures a cell
    the way the grid does."""
    n = spec.adaptive.race_requests
    return grid_requests(spec.repeat, concurrency) if n is None else max(n, concurrency)


def load_spec(path: Path | None, overrides: dict[str, Any]) -> SweepSpec:
    """YAML file (optional) + CLI values (`{"server.parallel": [1, 2], "mode": "adaptive"}`), validated."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"sweep spec {path}: {exc}", hint="pass a readable YAML file to --spec") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"sweep spec {path}: expected a mapping at the top level")
        data = loaded
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigErrors(problems, f"sweep spec ({source})", hint="see `wrapper bench-profile --help`") from None


@dataclass(frozen=True)
class ServerConfig:
    """One set of server flags. `values` holds only the swept knobs; `baseline` leaves them all unset."""

    values: tuple[tuple[str, Any], ...]
    baseline: bool = False

    @property
    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    @property
    def instances(self) -> int:
        return int(self.as_dict.get("instances", 1))

    @property
    def key(self) -> str:
        if self.baseline:
            return "defaults"
        return ",".join(f"{k}={v}" for k, v in self.values if k != "instances" or v != 1) or "profile"

    def settings_values(self, swept: tuple[str, ...]) -> dict[str, Any]:
        """Setting paths for Settings.with_layer: swept knobs set (or reset to None for the baseline)."""
        if self.baseline:
            return {f"llamacpp.{k}": None for k in swept if k != "instances"}
        return {f"llamacpp.{k}": v for k, v in self.values if k != "instances"}

    def cost(self, profile_defaults: dict[str, Any]) -> tuple[float, ...]:
        if self.baseline:
            # llama-server's own defaults (auto slots, all threads) have no known cost: a tie never favours them.
            return tuple(float("inf") for _ in _COST_ORDER)
        merged = {**profile_defaults, **self.as_dict}
        merged["kv_cells"] = (merged.get("ctx_size") or 0) * (merged.get("parallel") or 1)
        merged.setdefault("instances", 1)
        return tuple(_cost_number(merged.get(k)) for k in _COST_ORDER)


def _cost_number(value: object) -> float:
    """Knobs compare by size; words mean "as much as fits" (n_gpu_layers: all) or "the planner's choice"."""
    if value == "all":
        return float("inf")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return 0.0
    return float(value) if isinstance(value, int | float) else 0.0


@dataclass(frozen=True)
class ClientPoint:
    concurrency: int  # closed loop streams; with `rate`, the cap on requests in flight per instance
    prompt_words: int
    max_tokens: int
    rate: float | None = None

    @property
    def key(self) -> str:
        load = f"rate={self.rate:g}" if self.rate is not None else f"c={self.concurrency}"
        return f"{load},p={self.prompt_words},n={self.max_tokens}"


@dataclass(frozen=True)
class Cell:
    server: ServerConfig
    client: ClientPoint

    @property
    def key(self) -> str:
        return f"{self.server.key}|{self.client.key}"


@dataclass(frozen=True)
class Pruned:
    cell: Cell
    reason: str


def swept_dims(spec: SweepSpec) -> tuple[str, ...]:
    return tuple(d for d in SERVER_DIMS if getattr(spec.server, d) is not None and d != "instances")


def server_configs(spec: SweepSpec) -> list[ServerConfig]:
    dims = [(d, getattr(spec.server, d)) for d in SERVER_DIMS if getattr(spec.server, d) is not None]
    names = [d for d, _ in dims]
    combos = itertools.product(*[v for _, v in dims])
    configs = [ServerConfig(tuple(zip(names, combo, strict=True))) for combo in combos]
    if spec.baseline:
        configs.insert(0, ServerConfig((("instances", 1),), baseline=True))
    return configs


def client_points(spec: SweepSpec) -> list[ClientPoint]:
    c = spec.client
    if c.rate:
        return [ClientPoint(max(c.concurrency), p, n, rate)
                for rate, p, n in itertools.product(c.rate, c.prompt_words, c.max_tokens)]
    return [ClientPoint(*combo) for combo in itertools.product(c.concurrency, c.prompt_words, c.max_tokens)]


def plan_cells(spec: SweepSpec, profile_llamacpp: dict[str, Any]) -> tuple[list[Cell], list[Pruned]]:
    """All cells, grouped by server config (so a server starts once per group), minus the pruned ones."""
    cells: list[Cell] = []
    pruned: list[Pruned] = []
    swept = swept_dims(spec)
    for server in server_configs(spec):
        merged = effective(server, profile_llamacpp, swept)
        for client in client_points(spec):
            cell = Cell(server, client)
            reason = prune_reason(cell, merged)
            if reason:
                pruned.append(Pruned(cell, reason))
            else:
                cells.append(cell)
    return cells, pruned


def effective(server: ServerConfig, profile_llamacpp: dict[str, Any], swept: tuple[str, ...]) -> dict[str, Any]:
    """The llamacpp values a server config runs with: the profile's, with the config's knobs on top."""
    values = {k: v for k, v in profile_llamacpp.items() if not (server.baseline and k in swept)}
    if not server.baseline:
        values.update(server.as_dict)
    return values


def prune_reason(cell: Cell, merged: dict[str, Any], tokens: dict[int, int] | None = None) -> str | None:
    """Why a cell cannot produce a meaningful number, or None. Only certain failures: the rest are measured.
    `tokens`: the prompts' real token counts per prompt length, once a server has counted them."""
    slot, how = fit.slot_ctx(merged, cell.client.concurrency)
    why = fit.reason(cell.client.prompt_words, cell.client.max_tokens, slot, how, tokens)
    if why:
        return why
    batch, ubatch = merged.get("batch_size"), merged.get("ubatch_size")
    if batch and ubatch and ubatch > batch:
        return f"ubatch_size {ubatch} > batch_size {batch}: llama-server clamps it, duplicating another cell"
    return None
