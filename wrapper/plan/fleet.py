"""Fleet placement: which profile fits on which node and GPU, how fast, and one assignment for a list.

Nodes come from `mesh.node.announce.v1` heartbeats (read from NATS for a few seconds) or from an inventory
file of recorded announcements for nodes that are off. An announcement says what a node *is* (GPU names,
VRAM, RAM), not what is free on it now, so each device is planned against its total less a margin. Every
(profile, device) pair goes through the same planner as `wrapper plan`; a pair that does not fit as the
profile is written but fits with changes gets the joint search's best option and what it gives up.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from wrapper.errors import ConfigError
from wrapper.model.gguf_meta import ModelMeta
from wrapper.plan import placement, search, speed
from wrapper.plan.hardware import Gpu, Hardware
from wrapper.settings import Settings

SUBJECT = "mesh.node.announce.v1"
# An announcement gives totals: keep this share for the desktop, the driver and other tenants.
USABLE_SHARE = 0.95
_SIZE = re.compile(r"^([\d.]+)\s*(gb|gib|mb|mib|tb)$")
UNIFIED_GPU_SHARE = placement.UNIFIED_GPU_SHARE
_UNIFIED = re.compile(r"orin|jetson|gh200|gb10", re.I)  # GPU and CPU share one memory


class NodeDevice(BaseModel):
    node: str
    device: str  # "GPU0" or "CPU"
    gpu: str | None = None
    vram_mib: int | None = None
    bandwidth_gbps: float | None = None
    bandwidth_basis: str = "unknown"


class Node(BaseModel):
    node_id: str
    gpus: list[tuple[str, int | None]] = []  # (name, total VRAM MiB)
    ram_mib: int | None = None
    cpu_bandwidth_gbps: float | None = None
    arch: str | None = None
    unified_memory: bool = False

    def devices(self) -> list[NodeDevice]:
        out = []
        for i, (name, vram) in enumerate(self.gpus):
            bw = speed.gpu_bandwidth(name=name)
            out.append(NodeDevice(node=self.node_id, device=f"GPU{i}", gpu=name, vram_mib=vram,
                                  bandwidth_gbps=bw.gbps, bandwidth_basis=bw.basis))
        out.append(NodeDevice(node=self.node_id, device="CPU", bandwidth_gbps=self.cpu_bandwidth_gbps,
                              bandwidth_basis="announced" if self.cpu_bandwidth_gbps else "unknown"))
        return out

    def hardware(self, device: NodeDevice) -> Hardware:
        """A Hardware as the planner wants it for one device of this node."""
        gpus = []
        if device.device != "CPU" and device.vram_mib:
            budget = int(device.vram_mib * USABLE_SHARE)
            gpus = [Gpu(index=0, name=device.gpu or "GPU", vram_total_mib=device.vram_mib, vram_free_mib=budget)]
        ram = int(self.ram_mib * USABLE_SHARE) if self.ram_mib else None
        if self.unified_memory and gpus and ram is not None:
            # One pool: the GPU side may take UNIFIED_GPU_SHARE of it, the CPU side (embeddings, OS) the rest.
            share = int((self.ram_mib or 0) * UNIFIED_GPU_SHARE)
            gpus[0] = gpus[0].model_copy(update={"vram_free_mib": min(share, gpus[0].vram_free_mib or share)})
            ram = max(0, ram - share)
        return Hardware(gpus=gpus, ram_total_mib=self.ram_mib, ram_available_mib=ram,
                        cpu_bandwidth_gbps=self.cpu_bandwidth_gbps)


def _size_mib(text: str) -> int | None:
    m = _SIZE.match(text.strip().lower())
    if not m:
        return None
    factor = {"mb": 1, "mib": 1, "gb": 1024, "gib": 1024, "tb": 1 << 20}[m[2]]
    return int(float(m[1]) * factor)


def node_from_announce(data: Mapping[str, Any]) -> Node:
    """A Node from one announcement: our own payload (hardware block) or the seed's shorter one
    (capabilities like gpu:rtx5090, vram:32gb, ram:64gb, cpu:x86_64, membw:60gbps)."""
    node_id = str(data.get("node_id") or data.get("host") or "")
    if not node_id:
        raise ValueError("announcement without node_id")
    caps = [str(c) for c in data.get("capabilities") or []]
    hw = data.get("hardware") or {}
    caps += [str(c) for c in hw.get("capabilities") or [] if str(c) not in caps]
    gpu_names = [c.split(":", 1)[1] for c in caps if c.startswith("gpu:")]
    vrams = [_size_mib(c.split(":", 1)[1]) for c in caps if c.startswith("vram:")]
    full_names = [re.sub(r"\s*\(\d+ GiB\)$", "", str(g)) for g in hw.get("gpus") or []]
    names = full_names or gpu_names
    gpus = [(name, vrams[i] if i < len(vrams) else None) for i, name in enumerate(names)]
    ram = next((_size_mib(c.split(":", 1)[1]) for c in caps if c.startswith("ram:")), None)
    if ram is None and hw.get("ram_bytes"):
        ram = int(hw["ram_bytes"]) >> 20
    membw = next((c.split(":", 1)[1] for c in caps if c.startswith("membw:")), None)
    cpu_bw = float(membw.lower().removesuffix("gbps")) if membw else None
    arch = hw.get("arch") or next((c.split(":", 1)[1] for c in caps if c.startswith("cpu:")), None)
    unified = any(_UNIFIED.search(n) for n, _ in gpus)
    if unified:  # a Jetson announces its one memory pool; the GPU may use most of it
        gpus = [(n, v if v is not None else ram) for n, v in gpus]
    return Node(node_id=node_id, gpus=gpus, ram_mib=ram, cpu_bandwidth_gbps=cpu_bw, arch=arch,
                unified_memory=unified)


def load_inventory(path: Path) -> list[Node]:
    """Recorded announcements: a YAML or JSON list, or a mapping with `nodes:`."""
    from wrapper.profiles import safeyaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--inventory {path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else safeyaml.load(text, path).data
    except ValueError as exc:
        raise ConfigError(f"--inventory {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    items = data.get("nodes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"--inventory {path}: expected a list of announcements (or nodes: [...])")
    nodes = []
    for i, item in enumerate(items):
        try:
            nodes.append(node_from_announce(item))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"--inventory {path}: node {i + 1}: {exc}") from None
    return nodes


def listen(url: str, seconds: float) -> list[Node]:
    """Announcements heard on NATS within `seconds` (the latest per node)."""
    import nats

    heard: dict[str, Node] = {}

    async def main() -> None:
        nc = await nats.connect(url, connect_timeout=min(5.0, seconds), max_reconnect_attempts=0)

        async def on(msg: Any) -> None:
            try:
                node = node_from_announce(json.loads(msg.data))
            except (ValueError, TypeError, AttributeError):
                return  # a malformed heartbeat is some other node's problem, not a reason to stop
            heard[node.node_id] = node

        await nc.subscribe(SUBJECT, cb=on)
        await asyncio.sleep(seconds)
        await nc.drain()

    try:
        asyncio.run(main())
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise ConfigError(f"NATS_URL: cannot read {SUBJECT} from the server ({type(exc).__name__})",
                          hint="check NATS_URL, or pass --inventory FILE of recorded announcements") from None
    return list(heard.values())


# ------------------------------------------------------------------------------------------- placement


class Fit(BaseModel):
    profile: str
    node: str
    device: str
    gpu: str | None = None
    verdict: str  # "fits" | "fits with changes" | "no"
    tok_s_ceiling: float | None = None
    flags: str = ""
    gives_up: list[str] = []
    why: str = ""


class Placement(BaseModel):
    fits: list[Fit]
    assignment: dict[str, Fit]  # profile -> where it goes
    nowhere: dict[str, str]  # profile -> why it fits nowhere


def evaluate(profile: str, s: Settings, meta: ModelMeta, node: Node, device: NodeDevice) -> Fit:
    hw = node.hardware(device)
    base = Fit(profile=profile, node=node.node_id, device=device.device, gpu=device.gpu, verdict="no")
    if device.device != "CPU" and not hw.gpus:
        return base.model_copy(update={"why": "VRAM not announced"})
    inp, _ = placement.inputs_for(s, hw)
    if device.device == "CPU":
        inp = inp.model_copy(update={"vram_mib": [], "gpu_bandwidth_gbps": [], "n_gpu_layers": None})
    p = placement.plan(meta, inp, explore=False)
    if p.verdict == "ship":
        flags = f"-ngl {search.spell_ngl(p.n_gpu_layers, meta.n_layer)}" + \
            (f" --n-cpu-moe {p.n_cpu_moe}" if p.n_cpu_moe else "") + f" -c {p.ctx} -np {p.parallel}"
        return base.model_copy(update={"verdict": "fits", "tok_s_ceiling": p.tok_s_ceiling, "flags": flags})
    options = search.search(meta, inp, limit=1)
    if options:
        o = options[0]
        return base.model_copy(update={"verdict": "fits with changes", "tok_s_ceiling": o.tok_s_ceiling,
                                       "flags": o.flags(meta.n_layer), "gives_up": o.gives_up})
    short = [f"{d.device} short by {-d.margin_mib:.0f} MiB" for d in p.devices
             if d.margin_mib is not None and d.margin_mib < 0]
    return base.model_copy(update={"why": "; ".join(short) or "; ".join(p.decisions[-1:])})


def place(profiles: Mapping[str, tuple[Settings, ModelMeta]], nodes: Iterable[Node],
          unsized: Mapping[str, str] | None = None) -> Placement:
    """Every (profile, device) pair, then one profile per device: the assignment that places the most
    profiles, then the most as written (not "with changes"), then the highest summed tok/s ceiling."""
    node_list = list(nodes)
    fits = [evaluate(name, s, meta, node, dev) for name, (s, meta) in profiles.items()
            for node in node_list for dev in node.devices()
            if not (dev.device == "CPU" and _wants_gpu(s) and node.gpus)]
    usable = [f for f in fits if f.verdict != "no"]
    assignment = _assign(list(profiles), usable)
    nowhere = dict(unsized or {})
    for name in profiles:
        if name in assignment:
            continue
        if any(f.profile == name for f in usable):
            nowhere[name] = "every device it fits on is better used by another profile (one profile per device)"
        else:
            whys = sorted({f"{f.node}/{f.device}: {f.why}" for f in fits if f.profile == name and f.why})
            nowhere[name] = "fits on no device (" + ("; ".join(whys[:3]) or "no nodes") + ")"
    return Placement(fits=fits, assignment=assignment, nowhere=nowhere)


def _score(f: Fit) -> float:
    return 1e9 + (1e6 if f.verdict == "fits" else 0.0) + min(f.tok_s_ceiling or 0.0, 1e5)


def _assign(names: list[str], usable: list[Fit]) -> dict[str, Fit]:
    """Exact for up to 16 profiles (dynamic programming over devices x the set of profiles placed), greedy
    (most constrained profile first, its best free device) beyond that."""
    index = {n: i for i, n in enumerate(names)}
    devices: dict[tuple[str, str], list[Fit]] = {}
    for f in usable:
        devices.setdefault((f.node, f.device), []).append(f)
    if len(names) > 16:
        taken: set[tuple[str, str]] = set()
        out: dict[str, Fit] = {}
        for name in sorted(names, key=lambda n: sum(f.profile == n for f in usable)):
            free = sorted((f for f in usable if f.profile == name and (f.node, f.device) not in taken),
                          key=_score, reverse=True)
            if free:
                out[name] = free[0]
                taken.add((free[0].node, free[0].device))
        return out
    best: dict[int, tuple[float, tuple[Fit, ...]]] = {0: (0.0, ())}
    for options in devices.values():
        step = dict(best)
        for mask, (score, chosen) in best.items():
            for f in options:
                bit = 1 << index[f.profile]
                if mask & bit:
                    continue
                candidate = (score + _score(f), (*chosen, f))
                if candidate[0] > step.get(mask | bit, (-1.0, ()))[0]:
                    step[mask | bit] = candidate
        best = step
    _, chosen = max(best.values(), key=lambda v: v[0])
    return {f.profile: f for f in chosen}


def _wants_gpu(s: Settings) -> bool:
    """A profile with n_gpu_layers other than 0 is meant for a GPU; on a GPU node it does not take the CPU."""
    return s.server.n_gpu_layers not in (0, "0")
