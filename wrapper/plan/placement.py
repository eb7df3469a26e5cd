"""The placement planner: will this model fit, with which -ngl / --n-cpu-moe / ctx, and how fast?

Pure: `plan(meta, inputs)` takes the model's header facts and a budget and returns the memory map, the
flags, a decode-speed ceiling with its basis, and a verdict with every decision in words. It mirrors how
llama.cpp places a model: `-ngl N` offloads the *last* N repeating layers (N > n_layer also offloads the
output head), `--n-cpu-moe N` keeps the routed experts of the *first* N layers in RAM, the token embedding
always stays on the CPU, and each layer's KV cache lives where the layer lives. When VRAM runs short the
routed experts leave the GPU first (they are read top-k of E per token), then whole layers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from wrapper.errors import PlanRefused
from wrapper.model.gguf_meta import ModelMeta, read_local
from wrapper.plan.hardware import Hardware
from wrapper.profiles.schema import ALL_LAYERS  # one spelling of -ngl "all", shared with the flags
from wrapper.settings import Settings

MIB = 1 << 20
# Bytes per cache element: llama.cpp block formats (q8_0: 34 bytes per 32, q4_0: 18 per 32, ...).
CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
               "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
# Per GPU: the CUDA context, cuBLAS workspace and allocator slack that no buffer size shows. Measured on an
# H200 (driver 580, CUDA 13): nvidia-smi used exceeded weights + KV + compute by ~580 MiB for full offloads
# (benchmarks/gpu/compare_plan.py); 640 keeps the plan on the safe side of that.
GPU_OVERHEAD_MIB = 640
CTX_FLOOR = 4096  # an unset ctx is shrunk no further than this (llama-server's --fit-ctx default)
# On a unified-memory device (Jetson) the share of the one pool the GPU side may plan for.
UNIFIED_GPU_SHARE = 0.75
NGL_ALL_PLANNED = ALL_LAYERS  # a planned -ngl at or above this is "all" (no model has 999 layers)


class PlanInputs(BaseModel):
    vram_mib: list[int] = []  # usable VRAM per GPU (free memory, or --vram-mib); [] = CPU only
    ram_mib: int | None = None  # RAM budget; None = unknown
    ctx: int | None = None  # None/0: the model's training context (llama-server's default)
    parallel: int = 1
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = True
    ubatch: int = 512
    n_gpu_layers: int | None = None  # fixed by the user; None = the planner chooses
    n_cpu_moe: int | None = None
    gpu_bandwidth_gbps: list[float | None] = []
    gpu_bandwidth_basis: str = "NVML peak"
    cpu_bandwidth_gbps: float | None = None
    min_tok_s: float = 1.0
    mmproj_bytes: int = 0  # a multimodal projector GGUF (--mmproj): its tensor bytes
    mmproj_offload: bool = True  # llama-server loads it on the first GPU unless --no-mmproj-offload


class DeviceUse(BaseModel):
    device: str  # "GPU0", "CPU"
    budget_mib: int | None
    weights_mib: float
    kv_mib: float
    compute_mib: float
    overhead_mib: float = 0
    layers: int = 0

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.kv_mib + self.compute_mib + self.overhead_mib

    @property
    def margin_mib(self) -> float | None:
        return None if self.budget_mib is None else self.budget_mib - self.total_mib


class Plan(BaseModel):
    verdict: Literal["ship", "refuse"]
    n_gpu_layers: int
    n_cpu_moe: int
    ctx: int
    parallel: int
    cache_type_k: str
    cache_type_v: str
    devices: list[DeviceUse]
    kv_bytes: int
    weights_gpu_bytes: int
    weights_cpu_bytes: int
    tok_s_ceiling: float | None
    tok_s_basis: str
    decisions: list[str]
    alternatives: list[str] = []

    def flag_values(self) -> dict[str, int]:
        return {"n_gpu_layers": self.n_gpu_layers, "n_cpu_moe": self.n_cpu_moe, "ctx_size": self.ctx}

    def summary(self) -> dict[str, object]:
        data = self.model_dump()
        for d, raw in zip(data["devices"], self.devices, strict=True):
            d["total_mib"] = round(raw.total_mib, 1)
            d["margin_mib"] = None if raw.margin_mib is None else round(raw.margin_mib, 1)
        return data


def effective_ctx(ctx: int, parallel: int) -> int:
    """The n_ctx llama-server allocates: each sequence's share rounded up to 256 cells."""
    return parallel * _pad(-(-ctx // parallel), 256)


def kv_cells(meta: ModelMeta, il: int, ctx: int, parallel: int, ubatch: int) -> int:
    """KV cells of layer il. Sliding-window layers keep window + one ubatch per sequence (llama.cpp's
    non-unified iSWA cache, padded to 256), never more than the full cache."""
    if meta.swa_layers and meta.sliding_window and il < len(meta.swa_layers) and meta.swa_layers[il]:
        per_seq = min(ctx // parallel, _pad(meta.sliding_window + ubatch, 256))
        return per_seq * parallel
    return ctx


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def kv_layer_bytes(meta: ModelMeta, il: int, ctx: int, parallel: int, *, k: str, v: str, ubatch: int = 512,
                   flash_attn: bool = True) -> int:
    """Cache bytes of layer il as llama.cpp allocates them: K and V rows of n_head_kv x head dim per cell;
    no V for MLA (read as a view of K); a recurrent layer holds a fixed f32 state per sequence instead."""
    if meta.recurrent_layers and il < len(meta.recurrent_layers) and meta.recurrent_layers[il]:
        return meta.recurrent_state_elems * 4 * max(1, parallel)
    cells = kv_cells(meta, il, effective_ctx(ctx, parallel), parallel, ubatch)
    heads = meta.n_head_kv[il]
    k_bytes = math.ceil(cells * heads * meta.head_dim_k * CACHE_BYTES[k])
    if meta.mla or not heads:
        return k_bytes
    v_width = heads * meta.head_dim_v
    if not flash_attn:  # a transposed V cache is padded to the widest layer's V
        v_width = max(h * meta.head_dim_v for h in meta.n_head_kv)
    return k_bytes + math.ceil(cells * v_width * CACHE_BYTES[v])


def _kv(meta: ModelMeta, inp: PlanInputs, il: int, ctx: int) -> int:
    return kv_layer_bytes(meta, il, ctx, inp.parallel, k=inp.cache_type_k, v=inp.cache_type_v, ubatch=inp.ubatch,
                          flash_attn=inp.flash_attn)


def compute_bytes(meta: ModelMeta, ctx: int, parallel: int, ubatch: int, flash_attn: bool) -> int:
    """Estimate of one device's compute buffer: the largest live activations of one ubatch.

    The graph allocator reuses memory, so the peak is the residual stream plus the biggest of: attention
    scores (f32 n_kv x ubatch x heads without flash attention; flash attention needs only its output and
    an f16 mask), the FFN intermediates (gate and up, top-k experts for MoE) and the logits of one output
    per sequence. Calibrated against llama-server's own reports (benchmarks/plan_accuracy.py), rounded up.
    """
    n_ub = min(ubatch, ctx)
    n_kv = max(256, effective_ctx(ctx, parallel) // parallel)
    dense_ff = meta.n_ff or 4 * meta.n_embd
    if meta.is_moe:
        # A routed expert is expert_feed_forward_length wide where the GGUF says so (feed_forward_length is
        # then the dense layers' width, used only if there are dense layers): counting top-k x the dense
        # width put Qwen3-30B-A3B's compute buffer at 4.5x what llama-server allocates.
        expert_ff = (meta.n_ff_expert or dense_ff) * max(1, meta.n_expert_used + meta.n_expert_shared)
        has_dense = meta.n_ff_expert is not None and any(not layer.experts for layer in meta.layers)
        ff = max(expert_ff, dense_ff if has_dense else 0)
    else:
        ff = dense_ff
    # gate, up, activation and product live together.
    ffn = n_ub * ff * 4 * 4
    if flash_attn:
        attn = n_ub * meta.n_head * meta.head_dim_v * 4 * 2
        if meta.mla:  # the query absorbed into the latent space (kv_lora_rank + rope wide, f32) lives too
            attn += n_ub * meta.n_head * meta.head_dim_k * 4
    else:
        # f32 scores (softmax runs in place), an f32 copy of the mask, and the attention output.
        attn = n_kv * n_ub * (meta.n_head + 1) * 4 + n_ub * meta.n_head * meta.head_dim_v * 4 * 2
    mask = n_kv * n_ub * 2  # f16 KQ mask, an input alive for the whole graph
    logits = parallel * (meta.n_vocab or 0) * 4
    residual = n_ub * meta.n_embd * 4 * 4
    # 5% on top: the allocator's alignment and the small tensors this sketch leaves out.
    return math.ceil((residual + mask + max(ffn, attn, logits) + logits) * 1.05)


def _bytes_per_token(meta: ModelMeta, ngl: int, ncmoe: int) -> tuple[float, float]:
    """Weight bytes one decoded token reads on (GPU, CPU): routed experts only top-k of E."""
    first_gpu = meta.n_layer - min(ngl, meta.n_layer)
    active = meta.n_expert_used / meta.n_expert if meta.n_expert else 1.0
    gpu = cpu = 0.0
    for il, layer in enumerate(meta.layers):
        on_gpu = il >= first_gpu
        (gpu_add, cpu_add) = (layer.non_expert, 0) if on_gpu else (0, layer.non_expert)
        gpu += gpu_add
        cpu += cpu_add
        experts = layer.experts * active
        if on_gpu and il >= ncmoe:
            gpu += experts
        else:
            cpu += experts
    if ngl > meta.n_layer:
        gpu += meta.output_bytes
    else:
        cpu += meta.output_bytes
    return gpu, cpu


def _layout(meta: ModelMeta, inp: PlanInputs, ctx: int, ngl: int, ncmoe: int) -> list[DeviceUse]:
    """Bytes per device for one (ctx, -ngl, --n-cpu-moe); offloaded layers split by VRAM share."""
    n_gpu = len(inp.vram_mib)
    first_gpu = meta.n_layer - min(ngl, meta.n_layer) if n_gpu else meta.n_layer
    offloaded = meta.n_layer - first_gpu
    total_budget = sum(inp.vram_mib) or 1
    bounds, acc = [], 0.0
    for b in inp.vram_mib:
        acc += b / total_budget
        bounds.append(acc)
    w = [0.0] * (n_gpu + 1)  # index n_gpu is the CPU
    kv = [0.0] * (n_gpu + 1)
    nlayers = [0] * (n_gpu + 1)
    for il, layer in enumerate(meta.layers):
        if il < first_gpu:
            dev = n_gpu
        else:
            frac = (il - first_gpu) / max(offloaded, 1)
            dev = next((j for j, b in enumerate(bounds) if frac < b - 1e-9), n_gpu - 1)
        nlayers[dev] += 1
        w[dev] += layer.non_expert
        w[n_gpu if il < ncmoe else dev] += layer.experts
        kv[dev] += _kv(meta, inp, il, ctx)
    w[n_gpu] += meta.embeddings_bytes + meta.other_bytes
    head_dev = n_gpu - 1 if n_gpu and ngl > meta.n_layer else n_gpu  # the output head's device
    # A tied head is token_embd itself: llama.cpp loads a second copy only into another device's buffer
    # (the input embedding always stays on the CPU). Counting it on the CPU too was +45 % on a Gemma-3
    # model with a 262k vocabulary (issue 14).
    w[head_dev] += meta.output_bytes - (meta.tied_copy_bytes if head_dev == n_gpu else 0)
    w[0 if n_gpu and inp.mmproj_offload else n_gpu] += inp.mmproj_bytes
    compute = compute_bytes(meta, ctx, inp.parallel, inp.ubatch, inp.flash_attn)
    out = []
    for j in range(n_gpu + 1):
        is_cpu = j == n_gpu
        holds = nlayers[j] > 0 or j == head_dev
        out.append(DeviceUse(
            device="CPU" if is_cpu else f"GPU{j}",
            budget_mib=inp.ram_mib if is_cpu else inp.vram_mib[j],
            weights_mib=w[j] / MIB,
            kv_mib=kv[j] / MIB,
            compute_mib=compute / MIB if holds else (_host_compute(meta, inp) / MIB if is_cpu else 0.0),
            overhead_mib=GPU_OVERHEAD_MIB if not is_cpu else 0.0,
            layers=nlayers[j],
        ))
    return out


def _host_compute(meta: ModelMeta, inp: PlanInputs) -> int:
    # With every layer offloaded the CPU still looks up token embeddings for one ubatch.
    return inp.ubatch * meta.n_embd * 4 * 2


def _fits(devices: list[DeviceUse]) -> bool:
    return all(d.margin_mib is None or d.margin_mib >= 0 for d in devices)


def _ceiling(meta: ModelMeta, inp: PlanInputs, ngl: int, ncmoe: int) -> tuple[float | None, str]:
    gpu_b, cpu_b = _bytes_per_token(meta, ngl if inp.vram_mib else 0, ncmoe if inp.vram_mib else meta.n_layer)
    seconds, basis = 0.0, []
    if gpu_b:
        bws = [b for b in inp.gpu_bandwidth_gbps if b]
        if not bws or len(bws) < len(inp.vram_mib):
            return None, "GPU memory bandwidth unknown: no ceiling"
        seconds += gpu_b / (min(bws) * 1e9)
        basis.append(f"{gpu_b / MIB:.0f} MiB/token on GPU at {min(bws):g} GB/s ({inp.gpu_bandwidth_basis})")
    if cpu_b:
        if not inp.cpu_bandwidth_gbps:
            return None, "CPU memory bandwidth unknown (run `wrapper hw --measure-bandwidth`): no ceiling"
        seconds += cpu_b / (inp.cpu_bandwidth_gbps * 1e9)
        basis.append(f"{cpu_b / MIB:.0f} MiB/token on CPU at {inp.cpu_bandwidth_gbps:g} GB/s (measured)")
    if not seconds:
        return None, "no weights to read"
    return 1.0 / seconds, "roofline, weights only: " + "; ".join(basis)


def _evaluate(meta: ModelMeta, inp: PlanInputs, ctx: int, ngl: int, ncmoe: int) -> tuple[list[DeviceUse], bool]:
    devices = _layout(meta, inp, ctx, ngl, ncmoe)
    return devices, _fits(devices)


def _search(meta: ModelMeta, inp: PlanInputs, ctx: int) -> tuple[int, int, list[DeviceUse], bool, list[str]]:
    """Most offload that fits: all on GPU; then experts leave, first layers first; then whole layers."""
    why: list[str] = []
    full = meta.n_layer + 1
    if not inp.vram_mib:
        devices, ok = _evaluate(meta, inp, ctx, 0, 0)
        return 0, 0, devices, ok, ["no GPU: every layer on the CPU (-ngl 0)"]
    ngl_fixed, moe_fixed = inp.n_gpu_layers, inp.n_cpu_moe
    ngl = full if ngl_fixed is None else ngl_fixed
    moe = 0 if moe_fixed is None else moe_fixed
    devices, ok = _evaluate(meta, inp, ctx, ngl, moe)
    if ok or (ngl_fixed is not None and moe_fixed is not None):
        why.append(f"-ngl {ngl}" + (f" --n-cpu-moe {moe}" if moe else "") + (" fits" if ok else " does not fit"))
        return ngl, moe, devices, ok, why
    if meta.is_moe and moe_fixed is None:
        for moe in range(1, meta.n_layer + 1):
            devices, ok = _evaluate(meta, inp, ctx, ngl, moe)
            if ok:
                why.append(f"all layers do not fit in VRAM: the routed experts of the first {moe} layers stay "
                           f"in RAM (--n-cpu-moe {moe}); they are read {meta.n_expert_used} of {meta.n_expert} "
                           "per token, so they cost the least speed")
                return ngl, moe, devices, ok, why
        why.append("even with every routed expert in RAM the rest does not fit: whole layers leave the GPU")
    if ngl_fixed is None:
        for ngl in range(full - 1, -1, -1):
            devices, ok = _evaluate(meta, inp, ctx, ngl, moe)
            if ok:
                where = "the output head stays on the CPU" if ngl == meta.n_layer else \
                    f"the first {meta.n_layer - ngl} layers run on the CPU"
                why.append(f"-ngl {ngl}: {where} (the largest offload that fits)")
                return ngl, moe, devices, ok, why
    return ngl, moe, devices, ok, why


def plan(meta: ModelMeta, inp: PlanInputs, *, explore: bool = True) -> Plan:
    decisions: list[str] = list(meta.notes)
    user_ctx = bool(inp.ctx)
    ctx = inp.ctx or meta.n_ctx_train or CTX_FLOOR
    if not user_ctx:
        decisions.append(f"ctx unset: the model's training context {ctx} (llama-server's default)")
    elif meta.n_ctx_train and ctx > meta.n_ctx_train:
        decisions.append(f"ctx {ctx} exceeds the model's training context {meta.n_ctx_train}: output past it "
                         "degrades unless the model is meant to be rope-scaled")
    if effective_ctx(ctx, inp.parallel) != ctx:
        decisions.append(f"ctx {ctx} with {inp.parallel} slot(s): llama-server allocates "
                         f"{effective_ctx(ctx, inp.parallel)} cells (each slot rounded up to 256)")
    ngl, moe, devices, ok, why = _search(meta, inp, ctx)
    # An unset ctx is ours to choose: prefer a shorter context on the GPU over layers on the CPU.
    if not user_ctx and inp.vram_mib and (not ok or ngl <= meta.n_layer or moe):
        trial = ctx
        while trial > CTX_FLOOR:
            trial = max(CTX_FLOOR, trial // 2)
            t_ngl, t_moe, t_dev, t_ok, t_why = _search(meta, inp, trial)
            if t_ok and t_ngl > meta.n_layer and not t_moe:
                decisions.append(f"ctx {ctx} does not fit fully on the GPU: ctx {trial} keeps every layer there")
                ctx, ngl, moe, devices, ok, why = trial, t_ngl, t_moe, t_dev, t_ok, t_why
                break
    decisions += why
    caches = (("k", inp.cache_type_k, meta.head_dim_k), ("v", inp.cache_type_v, meta.head_dim_v))
    misaligned = [f"cache_type_{kind} {t} needs a head dim divisible by 32 (this model's is {dim})"
                  for kind, t, dim in caches
                  if CACHE_BYTES[t] < 2 and dim % 32]  # quantized blocks hold 32 elements of one head's row
    decisions += misaligned
    if inp.cache_type_v not in ("f16", "f32", "bf16") and not inp.flash_attn:
        decisions.append(f"cache_type_v {inp.cache_type_v} needs flash attention in llama.cpp (flash_attn on)")
    ceiling, basis = _ceiling(meta, inp, ngl, moe)
    for d in devices:
        if d.margin_mib is not None and d.margin_mib < 0:
            decisions.append(f"{d.device}: needs {d.total_mib:.0f} MiB, budget {d.budget_mib} MiB "
                             f"(short by {-d.margin_mib:.0f} MiB)")
    if any(d.budget_mib is None for d in devices if d.device == "CPU"):
        decisions.append("RAM budget unknown: the CPU side is not checked")
    slow = ceiling is not None and ceiling < inp.min_tok_s
    if slow:
        decisions.append(f"ceiling {ceiling:.2f} tok/s is below the floor {inp.min_tok_s:g} tok/s")
    verdict: Literal["ship", "refuse"] = "ship" if ok and not slow and not misaligned else "refuse"
    kv_total = sum(_kv(meta, inp, il, ctx)
                   for il in range(meta.n_layer))
    cpu = devices[-1]
    result = Plan(
        verdict=verdict, n_gpu_layers=ngl, n_cpu_moe=moe, ctx=ctx, parallel=inp.parallel,
        cache_type_k=inp.cache_type_k, cache_type_v=inp.cache_type_v, devices=devices, kv_bytes=kv_total,
        weights_gpu_bytes=round(sum(d.weights_mib for d in devices[:-1]) * MIB),
        weights_cpu_bytes=round(cpu.weights_mib * MIB), tok_s_ceiling=ceiling, tok_s_basis=basis,
        decisions=decisions,
    )
    if verdict == "refuse" and explore:
        result.alternatives = alternatives(meta, inp, ctx)
    return result


def alternatives(meta: ModelMeta, inp: PlanInputs, ctx: int) -> list[str]:
    """The cheapest single changes that would ship, cheapest first."""
    out: list[str] = []

    def ships(change: dict[str, object]) -> Plan | None:
        p = plan(meta, inp.model_copy(update=change), explore=False)
        return p if p.verdict == "ship" else None

    for trial in (ctx // 2, ctx // 4, ctx // 8, 4096, 2048):
        if 256 <= trial < ctx and (p := ships({"ctx": trial})):
            out.append(f"ctx {trial} fits" + _speed(p))
            break
    for cache in ("q8_0", "q4_0"):
        if inp.cache_type_k != cache and (p := ships({"cache_type_k": cache, "cache_type_v": cache,
                                                       "flash_attn": True})):
            out.append(f"{cache} KV cache fits" + _speed(p))
            break
    if inp.parallel > 1 and (p := ships({"parallel": 1})):
        out.append("parallel 1 fits" + _speed(p))
    fixed = inp.n_gpu_layers is not None or inp.n_cpu_moe is not None
    if fixed and (p := ships({"n_gpu_layers": None, "n_cpu_moe": None})):
        out.append(f"-ngl {p.n_gpu_layers} --n-cpu-moe {p.n_cpu_moe} fits" + _speed(p))
    return out


def _speed(p: Plan) -> str:
    return f" (ceiling ~{p.tok_s_ceiling:.0f} tok/s)" if p.tok_s_ceiling else ""


# --- from settings and hardware (the only part that knows about profiles) ---------------------------


def inputs_for(s: Settings, hw: Hardware, *, vram_mib: list[int] | None = None, ram_mib: int | None = None,
               ctx: int | None = None, parallel: int | None = None,
               gpu_name: str | None = None) -> tuple[PlanInputs, list[str]]:
    """PlanInputs from the effective settings and this hardware; explicit arguments win."""
    spec = s.server
    notes: list[str] = []
    if vram_mib is None and hw.unified_memory and hw.gpus:
        # One pool (Jetson): what is available is split once, the GPU side may take UNIFIED_GPU_SHARE and the
        # CPU side (the host's own needs, anything not offloaded) the rest, so the plan never counts it twice.
        pool = min(x for x in (hw.gpus[0].vram_free_mib, hw.ram_budget_mib) if x is not None) \
            if hw.gpus[0].vram_free_mib is not None or hw.ram_budget_mib is not None else 0
        vram_mib = [int(pool * UNIFIED_GPU_SHARE)]
        ram_mib = ram_mib if ram_mib is not None else pool - vram_mib[0]
        notes.append(f"unified memory ({hw.gpus[0].name}): one pool of {pool} MiB available, planned as "
                     f"{vram_mib[0]} MiB for the GPU and {ram_mib} MiB for the CPU")
    elif vram_mib is None:
        vram_mib = [g.vram_free_mib or 0 for g in hw.gpus]
        if hw.gpu_note:
            notes.append(hw.gpu_note)
    else:
        notes.append(f"VRAM budget given: {', '.join(f'{v} MiB' for v in vram_mib)}")
    from wrapper.plan import speed

    bws, bw_basis = speed.gpu_bandwidths(hw.gpus, len(vram_mib), gpu_name)
    fa = spec.flash_attn != "off"
    if spec.flash_attn in (None, "auto"):
        notes.append("flash_attn auto: assumed on (llama.cpp enables it where the backend supports it)")
    ngl = spec.n_gpu_layers
    fixed_ngl = None if ngl in (None, "auto") else (ALL_LAYERS if ngl == "all" else int(ngl))
    fixed_moe = spec.n_cpu_moe
    if spec.cpu_moe:
        fixed_moe = ALL_LAYERS
    inp = PlanInputs(
        vram_mib=vram_mib, ram_mib=ram_mib if ram_mib is not None else hw.ram_budget_mib,
        ctx=ctx if ctx is not None else spec.ctx_size, parallel=parallel or spec.parallel or 1,
        cache_type_k=spec.cache_type_k or "f16", cache_type_v=spec.cache_type_v or "f16", flash_attn=fa,
        ubatch=spec.ubatch_size or 512, n_gpu_layers=fixed_ngl, n_cpu_moe=fixed_moe,
        gpu_bandwidth_gbps=bws, gpu_bandwidth_basis=bw_basis, cpu_bandwidth_gbps=hw.cpu_bandwidth_gbps,
    )
    return inp, notes


def layer_for(s: Settings, model_file: Path, hardware: Hardware, *,
              fit_supported: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Setting-path values for `Settings.with_layer(values, "plan")` when llamacpp.n_gpu_layers is auto.

    With a llama-server that has `--fit` and a plan that needs nothing --fit cannot do (it only sizes
    unset -ngl/--n-cpu-moe/ctx against the memory it measures at load), the decision is handed to --fit
    and no value is set; otherwise the plan's values are returned. A refused plan raises PlanRefused.
    """
    if s.server.n_gpu_layers != "auto":
        return {}, []
    meta = read_local(model_file)
    inp, notes = inputs_for(s, hardware)
    p = plan(meta, inp)
    decisions = notes + p.decisions
    if p.verdict == "refuse":
        raise PlanRefused(
            f"placement: {meta.name or model_file.name} does not fit this machine "
            f"({'; '.join(d for d in p.decisions if 'short by' in d or 'below the floor' in d) or 'see wrapper plan'})",
            hint=("try: " + "; ".join(p.alternatives)) if p.alternatives else "run `wrapper plan` for the memory map",
        )
    planned = f"-ngl {p.n_gpu_layers}" + (f" --n-cpu-moe {p.n_cpu_moe}" if p.n_cpu_moe else "")
    if fit_supported and hardware.gpus:
        decisions.append(f"placement handed to llama-server --fit (it measures device memory at load); "
                         f"the plan predicts {planned}, ctx {p.ctx}")
        return {}, decisions
    values: dict[str, Any] = {"llamacpp.n_gpu_layers": p.n_gpu_layers}
    if p.n_cpu_moe:
        values["llamacpp.n_cpu_moe"] = p.n_cpu_moe
    if not inp.ctx:
        values["llamacpp.ctx_size"] = p.ctx
    decisions.append(f"placement from the plan: {planned}, ctx {p.ctx}")
    return values, decisions
