"""Does this llama.cpp build have kernels for the pinned GPU? A clear exit 2 instead of a crash at load.

A CUDA build carries machine code (SASS) for some architectures and, usually, PTX for others. SASS for
sm_XY runs on a GPU of the same major version with minor >= Y; PTX for compute_XY is compiled by the driver
for any GPU with capability >= X.Y. A build for 8.9 on an RTX 5090 (12.0) has no usable kernel unless it
shipped PTX; a build for 12.0 only cannot run on an RTX 4090 (8.9) at all.

The build's architectures come from a build-info file beside the binary (`<binary>.build-info`, written by
the image from its LLAMA_CUDA_ARCHS build argument), in either spelling:
    CUDA_ARCHITECTURES=86-real;89-real;120          (CMake's list: -real = SASS only, -virtual = PTX only)
    CUDA : ARCHS = 860,890,1200                     (llama.cpp's system_info line: real/virtual not said)
Nothing is known without that file, and nothing is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wrapper.errors import BinaryError

_CMAKE = re.compile(r"CUDA_ARCHITECTURES\s*=\s*(\S+)")
_SYSTEM_INFO = re.compile(r"ARCHS\s*=\s*([0-9][0-9,\s]*)")


@dataclass(frozen=True)
class Arch:
    """One entry of the build's list: capability as (major, minor), and what code it carries."""

    capability: tuple[int, int]
    sass: bool  # machine code for exactly this major (runs on minor >= this one)
    ptx: bool  # intermediate code the driver compiles for this capability and any later one
    spelling: str
    exact: bool = False  # "120a": arch-specific machine code, for that very capability only

    def runs_on(self, gpu: tuple[int, int]) -> bool:
        if self.sass and gpu[0] == self.capability[0] and gpu[1] >= self.capability[1]:
            return not self.exact or gpu == self.capability
        return self.ptx and gpu >= self.capability


def _capability(number: int) -> tuple[int, int]:
    # CMake says 89 or 120; __CUDA_ARCH__ (system_info) says 890 or 1200.
    if number >= 300:
        number //= 10
    return number // 10, number % 10


def parse(text: str) -> list[Arch]:
    """The architectures named in a build-info text; [] when it names none."""
    match = _CMAKE.search(text)
    if match:
        out = []
        for entry in re.split(r"[;,]", match.group(1)):
            found = re.fullmatch(r"(?:sm_|compute_)?(\d+)([af]?)(?:-(real|virtual))?", entry.strip())
            if not found:
                continue
            number, specific, kind = found.groups()
            # "120a": arch-specific features, SASS for exactly that GPU, never forward compatible as PTX.
            out.append(Arch(_capability(int(number)), sass=kind != "virtual", ptx=kind != "real" and not specific,
                            spelling=entry.strip(), exact=bool(specific)))
        return out
    match = _SYSTEM_INFO.search(text)
    if match:
        # Whether each entry also carried PTX is not said: assume it may have, so only a build whose every
        # architecture is newer than the GPU is refused.
        return [Arch(_capability(int(n)), sass=True, ptx=True, spelling=n)
                for n in re.findall(r"\d+", match.group(1))]
    return []


def build_info_path(binary: str) -> Path:
    return Path(f"{binary}.build-info")


def read(binary: str) -> list[Arch]:
    try:
        return parse(build_info_path(binary).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return []


def check(binary: str, gpus: list[tuple[str, str | None]]) -> str | None:
    """Raise BinaryError when the build has no kernel for one of the pinned GPUs (name, compute capability
    "X.Y" or None). Returns a note when the check could not be made or relies on the driver compiling PTX."""
    archs = read(binary)
    if not gpus:
        return None
    if not archs:
        return (f"CUDA architectures of {binary} unknown (no {build_info_path(binary).name}): the GPU "
                "compatibility check was skipped")
    listed = ",".join(a.spelling for a in archs)
    notes = []
    for name, cc in gpus:
        if cc is None:
            continue
        major, _, minor = cc.partition(".")
        gpu = (int(major), int(minor or 0))
        usable = [a for a in archs if a.runs_on(gpu)]
        if not usable:
            raise BinaryError(
                f"{binary} was built for CUDA architectures {listed}, none of which runs on the pinned {name} "
                f"(compute capability {cc}); llama-server would fail to load the model",
                hint=f"use an image built for sm_{gpu[0]}{gpu[1]} (build arg LLAMA_IMAGE; an RTX 5090 needs "
                "CUDA 12.8+ with sm_120), or pin another GPU (gpu.device_ids)",
            )
        if not any(a.sass and a.capability[0] == gpu[0] for a in usable):
            notes.append(f"{name} (compute capability {cc}) runs this build's PTX, compiled by the driver at the "
                         "first start (slow once, maybe slower kernels); a build with its own architecture is better")
    return "; ".join(notes) or None
