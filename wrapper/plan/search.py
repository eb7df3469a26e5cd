"""A joint search over the knobs that trade memory for speed or capacity, when a plan does not fit.

One knob at a time misses the common case: Qwen2.5-32B at ctx 131072 on 16 GiB fits neither by a smaller
ctx with every layer on the GPU nor by fewer layers at that ctx, but does with both (issue 14). So every
combination of ctx, parallel slots and KV cache type is planned with -ngl / --n-cpu-moe chosen by the
planner (the most offload that fits), the fitting ones are ranked by predicted tok/s, and an option that
gives up more than another for no more speed is dropped. Each option says what it gives up, in words.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel

from wrapper.model.gguf_meta import ModelMeta
from wrapper.plan import placement
from wrapper.plan.placement import PlanInputs
from wrapper.profiles.schema import ALL_LAYERS

Knob = Literal["ctx", "parallel", "cache", "offload"]
ALL_KNOBS: tuple[Knob, ...] = ("ctx", "parallel", "cache", "offload")
# Cheapest to give up first: a smaller KV cache type costs a little quality, fewer slots cost concurrency.
CACHE_ORDER = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "iq4_nl", "q4_1", "q4_0")
CTX_MIN = 2048
NGL_ALL = ALL_LAYERS  # how `wrapper flags` spells "every layer": one spelling everywhere


class Option(BaseModel):
    n_gpu_layers: int
    n_cpu_moe: int
    ctx: int
    parallel: int
    cache_type_k: str
    cache_type_v: str
    tok_s_ceiling: float | None
    gives_up: list[str]  # in words, against what was asked
    changed: list[Knob]

    def flags(self, n_layer: int) -> str:
        out = f"-ngl {spell_ngl(self.n_gpu_layers, n_layer)}"
        if self.n_cpu_moe:
            out += f" --n-cpu-moe {self.n_cpu_moe}"
        return out + f" -c {self.ctx} -np {self.parallel} -ctk {self.cache_type_k} -ctv {self.cache_type_v}"


def spell_ngl(n: int, n_layer: int) -> str:
    """-ngl as `wrapper flags` writes it: the profile's `all` (planned as 10**6) is `999`; a count the
    planner chose is the count the plan layer hands to flags (n_layer + 1 offloads the output head too)."""
    return str(NGL_ALL) if n >= placement.NGL_ALL_PLANNED else str(n)


def _ctx_steps(ctx: int) -> list[int]:
    """Halvings down to 2048, or to an eighth of a context that starts below 16k (never under 256)."""
    floor = min(CTX_MIN, max(256, ctx // 8))
    steps = [ctx]
    while steps[-1] // 2 >= floor:
        steps.append(steps[-1] // 2)
    if steps[-1] > floor:
        steps.append(floor)
    return steps


def _parallel_steps(parallel: int) -> list[int]:
    steps = [parallel]
    while steps[-1] > 1:
        steps.append(max(1, steps[-1] // 2))
    return steps


def _cache_steps(meta: ModelMeta, current: str) -> list[str]:
    steps = [current]
    # Quantized cache blocks hold 32 elements of one head's row; other head sizes cannot use them.
    if meta.head_dim_k % 32 == 0 and meta.head_dim_v % 32 == 0:
        steps += [c for c in ("q8_0", "q4_0") if CACHE_ORDER.index(c) > CACHE_ORDER.index(current)]
    return steps


def _gives_up(meta: ModelMeta, base: PlanInputs, base_ctx: int, base_ngl: int | None, p: placement.Plan) -> \
        tuple[list[str], list[Knob]]:
    words: list[str] = []
    changed: list[Knob] = []
    if p.ctx < base_ctx:
        words.append(f"ctx {base_ctx} -> {p.ctx}")
        changed.append("ctx")
    if p.parallel < base.parallel:
        words.append(f"parallel {base.parallel} -> {p.parallel}")
        changed.append("parallel")
    if p.cache_type_k != base.cache_type_k or p.cache_type_v != base.cache_type_v:
        words.append(f"KV cache {base.cache_type_k}/{base.cache_type_v} -> {p.cache_type_k}/{p.cache_type_v}")
        changed.append("cache")
    full = meta.n_layer + 1
    wanted = full if base_ngl is None else min(base_ngl, full)
    if base.vram_mib and (p.n_gpu_layers < wanted or p.n_cpu_moe > (base.n_cpu_moe or 0)):
        parts = []
        if p.n_gpu_layers < wanted:
            parts.append(f"{meta.n_layer - min(p.n_gpu_layers, meta.n_layer)} layer(s) on the CPU"
                         if p.n_gpu_layers <= meta.n_layer else "the output head on the CPU")
        if p.n_cpu_moe > (base.n_cpu_moe or 0):
            parts.append(f"routed experts of {p.n_cpu_moe} layer(s) in RAM")
        words.append(" and ".join(parts))
        changed.append("offload")
    return words, changed


def search(meta: ModelMeta, inp: PlanInputs, *, knobs: Iterable[Knob] = ALL_KNOBS, limit: int = 4,
           fixed_offload: tuple[int, int] | None = None) -> list[Option]:
    """Configurations that ship, best predicted tok/s first, none dominated by another.

    `knobs` limits what may change (the step-down passes only what the profile leaves to the wrapper);
    without "offload", -ngl / --n-cpu-moe stay as the user set them, or at `fixed_offload`.
    """
    allowed = set(knobs)
    base_ctx = inp.ctx or meta.n_ctx_train or placement.CTX_FLOOR
    ctxs = _ctx_steps(base_ctx) if "ctx" in allowed else [base_ctx]
    parallels = _parallel_steps(inp.parallel) if "parallel" in allowed else [inp.parallel]
    caches = _cache_steps(meta, inp.cache_type_k) if "cache" in allowed else [inp.cache_type_k]
    if "offload" in allowed:
        ngl, moe = None, None
    elif fixed_offload is not None:
        ngl, moe = fixed_offload
    else:
        ngl, moe = inp.n_gpu_layers, inp.n_cpu_moe
    found: list[Option] = []
    for parallel in parallels:
        for cache in caches:
            for ctx in ctxs:
                if ctx < parallel * 256:
                    break
                change: dict[str, object] = {"ctx": ctx, "parallel": parallel, "n_gpu_layers": ngl, "n_cpu_moe": moe}
                if cache != inp.cache_type_k:
                    change.update(cache_type_k=cache, cache_type_v=cache, flash_attn=True)
                p = placement.plan(meta, inp.model_copy(update=change), explore=False)
                if p.verdict != "ship":
                    continue
                words, changed = _gives_up(meta, inp, base_ctx, inp.n_gpu_layers, p)
                found.append(Option(n_gpu_layers=p.n_gpu_layers, n_cpu_moe=p.n_cpu_moe, ctx=p.ctx,
                                    parallel=p.parallel, cache_type_k=p.cache_type_k, cache_type_v=p.cache_type_v,
                                    tok_s_ceiling=p.tok_s_ceiling, gives_up=words, changed=changed))
                if not inp.vram_mib or (p.n_gpu_layers > meta.n_layer and not p.n_cpu_moe):
                    break  # a smaller ctx would give up more for no more speed
    return rank(_frontier(found, meta))[:limit]


def _keeps(a: Option, b: Option) -> bool:
    """a gives up no more than b on every knob."""
    return (a.ctx >= b.ctx and a.parallel >= b.parallel
            and CACHE_ORDER.index(a.cache_type_k) <= CACHE_ORDER.index(b.cache_type_k)
            and a.n_gpu_layers >= b.n_gpu_layers and a.n_cpu_moe <= b.n_cpu_moe)


def _frontier(options: list[Option], meta: ModelMeta) -> list[Option]:
    out: list[Option] = []
    for o in options:
        speed = o.tok_s_ceiling or 0.0
        dominated = any(other is not o and _keeps(other, o) and (other.tok_s_ceiling or 0.0) >= speed
                        and other.flags(meta.n_layer) != o.flags(meta.n_layer) for other in options)
        if not dominated and all(x.flags(meta.n_layer) != o.flags(meta.n_layer) for x in out):
            out.append(o)
    return out


def rank(options: list[Option]) -> list[Option]:
    """Fastest first; among equals the one that gives up fewer knobs, then the larger context."""
    return sorted(options, key=lambda o: (-(o.tok_s_ceiling or 0.0), len(o.changed), -o.ctx, -o.parallel))


STEP_DOWN_ORDER: tuple[Knob, ...] = ("ctx", "parallel", "cache", "offload")


def step_down(meta: ModelMeta, inp: PlanInputs, allowed: Iterable[Knob],
              offload: tuple[int, int]) -> Option | None:
    """The configuration to retry with after an out-of-memory start: shrink ctx first, then parallel, then
    the KV cache type, then offload experts/layers; each stage adds one knob to those the search may turn,
    so a smaller ctx alone is preferred to fewer slots. Only knobs in `allowed` are ever turned."""
    permitted = [k for k in STEP_DOWN_ORDER if k in set(allowed)]
    for stage in range(1, len(permitted) + 1):
        options = search(meta, inp, knobs=permitted[:stage], limit=1, fixed_offload=offload)
        if options:
            return options[0]
    return None
