"""The GGUF integrity check run on every local model file before llama-server sees it.

Reads only the header (key/values and tensor infos) and answers: is this a GGUF file, of a version we
know, and is it at least as long as its own tensor table says? A truncated copy or download passes a
magic check but fails the length check, and llama-server would otherwise crash on it (or, with mmap,
fault at the first read of a missing page). Full metadata reading lives in wrapper/gguf_meta.py.
"""

from __future__ import annotations

import functools
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from wrapper.errors import ModelVerificationFailed

MAGIC = b"GGUF"
VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of a scalar; 8 = string and 9 = array are handled apart.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 30  # a "string" longer than this means the header is garbage, not a model


@dataclass(frozen=True)
class GgufHeader:
    version: int
    n_tensors: int
    n_kv: int
    data_offset: int  # where tensor data starts
    required_size: int  # the file must be at least this long
    split_count: int  # split.count, 0 when absent
    split_no: int


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh, self.path = fh, path

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise _Truncated
        return data

    def scalar(self, fmt: str) -> int | float | bool:
        size = struct.calcsize("<" + fmt)
        value: int | float | bool = struct.unpack("<" + fmt, self.take(size))[0]
        return value

    def u32(self) -> int:
        return int(self.scalar("I"))

    def u64(self) -> int:
        return int(self.scalar("Q"))

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise _Garbage(f"a string of {n} bytes at offset {self.fh.tell() - 8}")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in _SCALARS:
                # Skip scalar arrays in one read: token scores and types are 100k+ entries.
                self.take(struct.calcsize("<" + _SCALARS[item_type]) * count)
                return None
            for _ in range(count):
                self.value(item_type)
            return None
        if vtype not in _SCALARS:
            raise _Garbage(f"unknown value type {vtype}")
        return self.scalar(_SCALARS[vtype])


class _Truncated(Exception):
    pass


class _Garbage(Exception):
    pass


def read_header(path: Path) -> GgufHeader:
    """Parse the header; raise ModelVerificationFailed when the file is not a (complete) GGUF."""
    try:
        with path.open("rb") as fh:
            return _parse(_Reader(fh, path), path.stat().st_size)
    except _Truncated:
        raise ModelVerificationFailed(
            f"model file is truncated: {path} ends inside its GGUF header ({path.stat().st_size} bytes)",
            hint="the copy or download was interrupted: delete the file and fetch it again (`wrapper fetch`)",
        ) from None
    except _Garbage as exc:
        raise ModelVerificationFailed(f"model file is not a valid GGUF: {path}: {exc}") from None
    except ModelVerificationFailed:
        raise  # it is an OSError too (FileNotFoundError), so it must pass the clause below untouched
    except OSError as exc:
        raise ModelVerificationFailed(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _parse(r: _Reader, file_size: int) -> GgufHeader:
    magic = r.take(4)
    if magic != MAGIC:
        raise ModelVerificationFailed(
            f"model file is not a GGUF file: {r.path} starts with {magic!r}, expected {MAGIC!r}",
            hint="llama-server needs a .gguf model; convert or download the GGUF variant",
        )
    version = r.u32()
    if version not in VERSIONS:
        raise ModelVerificationFailed(
            f"model file {r.path} has GGUF version {version}; this wrapper knows versions {VERSIONS}"
        )
    n_tensors, n_kv = r.u64(), r.u64()
    alignment, split_count, split_no = _DEFAULT_ALIGNMENT, 0, 0
    for _ in range(n_kv):
        key, vtype = r.string(), r.u32()
        value = r.value(vtype)
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
        elif key == "split.count" and isinstance(value, int):
            split_count = value
        elif key == "split.no" and isinstance(value, int):
            split_no = value
    constants = _gguf_constants()
    GGML_QUANT_SIZES, GGMLQuantizationType = constants.GGML_QUANT_SIZES, constants.GGMLQuantizationType

    data_end = 0
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        dims = [r.u64() for _ in range(n_dims)]
        ggml_type, offset = r.u32(), r.u64()
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise _Garbage(f"tensor {name!r} has unknown type {ggml_type}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        data_end = max(data_end, offset + n_elements // block * type_size)
    header_end = r.fh.tell()
    data_offset = (header_end + alignment - 1) // alignment * alignment
    required = data_offset + data_end if n_tensors else header_end
    if file_size < required:
        raise ModelVerificationFailed(
            f"model file is truncated: {r.path} is {file_size} bytes but its GGUF header needs {required}",
            hint="the copy or download was interrupted: delete the file and fetch it again (`wrapper fetch`)",
        )
    return GgufHeader(version, n_tensors, n_kv, data_offset, required, split_count, split_no)


@functools.cache
def _gguf_constants() -> Any:
    """The `gguf` package's constants module without the package: importing `gguf` pulls in numpy and
    its readers (~0.17 s), and this check runs on every `wrapper serve` start. constants.py imports
    nothing but the standard library, so it loads on its own; the block sizes stay the package's."""
    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        import gguf.constants

        return gguf.constants
    path = Path(next(iter(spec.submodule_search_locations))) / "constants.py"
    module_spec = importlib.util.spec_from_file_location("wrapper._gguf_constants", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
