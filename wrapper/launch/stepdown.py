"""Step down instead of crash-looping: after llama-server fails to load for lack of memory, one smaller launch.

llama-server's own `--fit` adjusts unset knobs at load, but aborts when the user set the ones it would
change, and a plan can be wrong on a machine where something else took memory after it was measured. Then
the wrapper replans with the budget it now knows (free memory measured again, capped by what the failed
allocation says was missing) and retries once with the best configuration that fits, turning only the knobs
the profile left to the wrapper (origin default or plan): ctx first, then parallel, then the KV cache type,
then offload of experts and layers. What it gave up is logged, published and shown in /status.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from wrapper.launch import flags
from wrapper.launch.prepare import Launch
from wrapper.plan import hardware, placement, search
from wrapper.plan.search import Knob

if TYPE_CHECKING:
    from wrapper.model.gguf_meta import ModelMeta

log = logging.getLogger("wrapper.serve")

# The failure kind of wrapper.supervisor.classify that means "not enough memory" (llama.cpp's allocation
# errors, or the kernel's OOM kill counter), and its earlier spelling.
OOM_KINDS = frozenset({"oom", "out_of_memory"})
# Origins of a value the wrapper may change on its own: nobody chose it, or the plan did.
_FREE_ORIGINS = ("default", "plan")
STEP_DOWN_ORIGIN = "step-down"

# llama.cpp's words for the allocation that failed: "failed to allocate buffer of size 17179869216" (ggml
# backends, bytes) or "allocating 16384.00 MiB on device 0: cudaMalloc failed" (CUDA).
_SIZE_BYTES = re.compile(r"of size (\d+)")
_SIZE_MIB = re.compile(r"allocating ([\d.]+) MiB on device (\d+)")
_GPU_WORDS = re.compile(r"cuda|vulkan|metal|rocm|hip|device \d|gpu", re.I)


@dataclass(frozen=True)
class StepDown:
    launch: Launch
    gave_up: list[str]
    summary: str  # one line for logs, events and /status


def is_oom(kind: str | None) -> bool:
    return kind in OOM_KINDS


def allowed_knobs(launch: Launch) -> list[Knob]:
    """The knobs the profile leaves to the wrapper (their origin is default or plan)."""
    s = launch.settings

    def free(*paths: str) -> bool:
        return all(s.origin(p) in _FREE_ORIGINS for p in paths)

    knobs: list[Knob] = []
    if free("llamacpp.ctx_size"):
        knobs.append("ctx")
    if free("llamacpp.parallel"):
        knobs.append("parallel")
    if free("llamacpp.cache_type_k", "llamacpp.cache_type_v"):
        knobs.append("cache")
    if free("llamacpp.n_gpu_layers", "llamacpp.n_cpu_moe") and launch.host.gpus:
        knobs.append("offload")
    return knobs


def failed_allocation(lines: tuple[str, ...] | list[str]) -> tuple[float | None, int | None, bool]:
    """(MiB that failed to allocate, GPU index, whether it was a GPU) from llama.cpp's error lines."""
    for line in lines:
        if m := _SIZE_MIB.search(line):
            return float(m[1]), int(m[2]), True
    for line in lines:
        if m := _SIZE_BYTES.search(line):
            return int(m[1]) / placement.MIB, None, bool(_GPU_WORDS.search(line))
    return None, None, any(_GPU_WORDS.search(line) for line in lines)


def _budget(inp: placement.PlanInputs, failed: placement.Plan, lines: tuple[str, ...] | list[str]) -> \
        tuple[dict[str, Any], str]:
    """Budgets the retry must fit: the re-measured ones, capped on the failing device by the failed plan's
    total less half of the allocation that failed (halving what did not fit is the assumption; an
    allocation larger than the whole plan means the plan was wrong, and then the total is halved), or by
    85% of that total when llama.cpp did not say how much it asked for."""
    mib, gpu_index, on_gpu = failed_allocation(lines)
    devices = {d.device: d for d in failed.devices}
    targets = [f"GPU{gpu_index}"] if on_gpu and gpu_index is not None else \
        [d for d in devices if d.startswith("GPU")] if on_gpu and inp.vram_mib else ["CPU"]
    vram = list(inp.vram_mib)
    ram = inp.ram_mib
    for name in targets:
        need = devices[name].total_mib if name in devices else 0.0
        cap = int(need - min(mib, need) / 2) if mib else int(need * 0.85)
        if name == "CPU":
            ram = cap if ram is None else min(ram, cap)
        else:
            j = int(name[3:])
            if j < len(vram):
                vram[j] = min(vram[j], cap)
    asked = f"{mib:.0f} MiB" if mib else "an unknown size"
    return {"vram_mib": vram, "ram_mib": ram}, f"{'/'.join(targets)} could not allocate {asked}"


def replan(launch: Launch, kind: str | None, lines: tuple[str, ...] | list[str]) -> StepDown | None:
    """The smaller launch to retry with after an out-of-memory start, or None (with the reason logged)."""
    if not is_oom(kind):
        return None
    knobs = allowed_knobs(launch)
    if not knobs:
        log.error("step-down: out of memory at load, but the profile sets ctx, parallel, cache types and "
                  "offload itself: nothing is left to the wrapper to shrink")
        return None
    from wrapper.model import gguf_meta

    s = launch.settings
    meta = gguf_meta.read_local(launch.model_file)
    now = hardware.with_host_facts(hardware.for_settings(s), s.env.state_path())
    inp, _ = placement.inputs_for(s, now)
    failed = placement.plan(meta, inp.model_copy(update={"ctx": inp.ctx or launch_ctx(launch, meta)}),
                            explore=False)
    update, why = _budget(inp, failed, lines)
    inp = inp.model_copy(update={**update, "ctx": failed.ctx})
    option = search.step_down(meta, inp, knobs, offload=(failed.n_gpu_layers, failed.n_cpu_moe))
    if option is None:
        log.error("step-down: %s and no smaller configuration of %s fits", why, ", ".join(knobs))
        return None
    values: dict[str, Any] = {}
    if option.ctx != failed.ctx:
        values["llamacpp.ctx_size"] = option.ctx
    if option.parallel != failed.parallel:
        values["llamacpp.parallel"] = option.parallel
    if option.cache_type_k != inp.cache_type_k:
        values.update({"llamacpp.cache_type_k": option.cache_type_k, "llamacpp.cache_type_v": option.cache_type_v,
                       "llamacpp.flash_attn": "on"})
    if "offload" in option.changed:
        values.update({"llamacpp.n_gpu_layers": option.n_gpu_layers, "llamacpp.n_cpu_moe": option.n_cpu_moe})
    smaller, _ = s.with_layer(values, STEP_DOWN_ORIGIN)
    command = flags.derive(smaller, launch.capabilities, launch.model_file)
    summary = f"step-down after out of memory at load ({why}): " + "; ".join(option.gives_up)
    # No longer the tuned config as bench-profile measured it: its self-check neither vouches for that run
    # (last_good) nor blames it for an out-of-memory start (a rollback).
    return StepDown(replace(launch, settings=smaller, command=command, decisions=(*launch.decisions, summary),
                            tuned=None, expected=None), list(option.gives_up), summary)


def launch_ctx(launch: Launch, meta: ModelMeta) -> int:
    """The ctx the failed launch ran with: its --ctx-size, else llama-server's default (training ctx)."""
    for arg in launch.command.args:
        if arg.knob == "ctx_size" and arg.value and str(arg.value).isdigit():
            return int(arg.value)
    return int(meta.n_ctx_train or placement.CTX_FLOOR)
