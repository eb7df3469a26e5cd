"""The one GGUF reader: header key/values and tensor infos, and the integrity check before llama-server runs.

Only the header is read, from a local file (`read_header`, `check`) or from any `read(n) -> first n bytes`
source (`parse`; wrapper/model/gguf_meta.py feeds it HTTP range reads). Tensor byte sizes follow from
shape and type (the `gguf` package's block sizes).

`check(path)` asks: is this a GGUF of a version we know, at least as long as its own tensor table says? A
truncated copy passes a magic check, and llama-server would crash on it (or, with mmap, fault at the
first read of a missing page).

Every count and length in a header is bounded by the bytes that can still follow it, and arrays nest at
most _MAX_DEPTH deep: crafted headers (counts of 2**63, deeply nested arrays, an 8 EiB string) used to raise
RecursionError, MemoryError or OverflowError (issue 15 item 12); now they are one ModelVerificationFailed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wrapper.errors import ModelVerificationFailed
from wrapper.model.files import why_unreachable

_FIRST_READ = 1 << 20  # the first read; it grows 4x until the header parses
MAX_HEADER = 512 << 20  # no sane header is this big; beyond it the file is not a GGUF we can read
VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DEPTH = 3  # arrays of arrays exist in the spec; deeper nesting is only ever an attack
_MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF value type -> struct format of a scalar; 8 = string and 9 = array are handled apart.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# The fewest bytes one item of each type takes: bounds a count before any loop runs.
_MIN_BYTES = {**{t: struct.calcsize("<" + f) for t, f in _SCALAR.items()}, _STRING: 8, _ARRAY: 12}
# Arrays longer than this (token lists, merges) are skipped, not kept: we only need per-layer arrays.
_KEEP_ARRAY = 4096
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Tensor:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int  # into the data section

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(list(self.ne), self.ggml_type)


@dataclass(frozen=True)
class Header:
    version: int
    kv: dict[str, Any]  # long arrays are None: only their length was walked
    tensors: list[Tensor]
    header_end: int

    @property
    def data_offset(self) -> int:
        alignment = self.kv.get("general.alignment")
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            alignment = _DEFAULT_ALIGNMENT
        return (self.header_end + alignment - 1) // alignment * alignment

    @property
    def required_size(self) -> int:
        """The file must be at least this long to hold every tensor its header lists."""
        if not self.tensors:
            return self.header_end
        return self.data_offset + max(t.offset + t.nbytes for t in self.tensors)


class _Short(Exception):
    """The data ran out before the header did (the message says where)."""


class _Bad(Exception):
    """The header cannot be a GGUF (the message says why)."""


class _Reader:
    """The first bytes of a file of `limit` bytes, read on demand through `read(n)` (the first n bytes)."""

    def __init__(self, read: Callable[[int], bytes], limit: int) -> None:
        self.read, self.limit = read, limit
        self.data, self.pos = b"", 0

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if end > self.limit:
            raise _Short(f"{what} at offset {self.pos} needs {n} bytes, past byte {self.limit}")
        if end > len(self.data):
            self.data = self.read(min(max(end, 4 * len(self.data), _FIRST_READ), self.limit))
            if len(self.data) < end:
                raise _Short(f"{what} at offset {self.pos} needs {n} bytes; the file ends at {len(self.data)}")

    def bound(self, count: int, item_type: int, what: str) -> None:
        """Refuse a count whose items cannot fit in what is left, before walking it."""
        if count * _MIN_BYTES[item_type] > self.limit - self.pos:
            raise _Short(f"{what} count {count} at offset {self.pos} cannot fit in {self.limit} bytes")

    def take(self, n: int, what: str = "data") -> bytes:
        self.need(n, what)
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, "a number")
        self.pos += size
        return struct.unpack_from("<" + fmt, self.data, self.pos - size)[0]

    def skip_strings(self, count: int) -> None:
        """Walk past `count` strings without decoding them (token lists and merges: 100k+ each)."""
        for _ in range(count):
            self.need(8, "a string length")
            n = _U64.unpack_from(self.data, self.pos)[0]
            self.pos += 8
            self.need(n, "a string")
            self.pos += n

    def string(self) -> str:
        return self.take(self.unpack("Q"), "a string").decode("utf-8", errors="replace")


def _value(r: _Reader, vtype: int, depth: int = 0) -> Any:
    if vtype in _SCALAR:
        return r.unpack(_SCALAR[vtype])
    if vtype == _STRING:
        return r.string()
    if vtype != _ARRAY:
        raise _Bad(f"unknown value type {vtype} at offset {r.pos}")
    if depth >= _MAX_DEPTH:
        raise _Bad(f"arrays nested more than {_MAX_DEPTH} deep at offset {r.pos}")
    etype, count = r.unpack("I"), r.unpack("Q")
    if etype not in _MIN_BYTES:
        raise _Bad(f"array of unknown value type {etype} at offset {r.pos}")
    r.bound(count, etype, "array")
    if etype in _SCALAR and count > _KEEP_ARRAY:
        r.take(count * _MIN_BYTES[etype])  # token scores and types are 100k+ entries: skip in one step
        return None
    if etype == _STRING:
        r.skip_strings(count)
        return None
    items = [_value(r, etype, depth + 1) for _ in range(count)]
    return items if etype in _SCALAR else None


def _parse(r: _Reader, where: str) -> Header:
    magic = r.take(4, "the magic")
    if magic != b"GGUF":
        raise ModelVerificationFailed(
            f"{where}: not a GGUF file (bad magic {magic!r})",
            hint="llama-server needs a .gguf model; convert or download the GGUF variant",
        )
    version = r.unpack("I")
    if version not in VERSIONS:
        raise ModelVerificationFailed(f"{where}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    r.bound(n_kv, _ARRAY, "key/value")  # a key (8) + a type (4) is the least one entry takes
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = _value(r, r.unpack("I"))
    r.bound(n_tensors, _STRING, "tensor")
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        if n_dims > _MAX_DIMS:
            raise _Bad(f"tensor {name[:64]!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        ne = tuple(r.unpack("Q") for _ in range(n_dims))
        tensor = Tensor(name, ne, r.unpack("I"), r.unpack("Q"))
        tensor.nbytes  # noqa: B018  (an unknown type is refused here, with the tensor's name)
        tensors.append(tensor)
    return Header(version, kv, tensors, r.pos)


def parse(read: Callable[[int], bytes], limit: int, where: str) -> Header:
    """The header of a file of `limit` bytes whose first n bytes `read(n)` returns."""
    try:
        return _parse(_Reader(read, limit), where)
    except _Short as exc:
        raise ModelVerificationFailed(
            f"{where}: GGUF header is truncated or corrupt: {exc}",
            hint="the copy or download was interrupted: delete the file and fetch it again (`wrapper fetch`)",
        ) from None
    except _Bad as exc:
        raise ModelVerificationFailed(f"{where}: not a valid GGUF header: {exc}") from None


def read_header(path: Path) -> Header:
    """Parse a local file's header without opening anything but a regular file (never a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ModelVerificationFailed(f"cannot read model file {path}: {why_unreachable(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelVerificationFailed(f"model file {path} is not a regular file")
        return parse(lambda n: os.pread(fd, n, 0), min(st.st_size, MAX_HEADER), str(path))
    except ModelVerificationFailed:
        raise  # it is an OSError too (FileNotFoundError), so it must pass the clause below untouched
    except OSError as exc:
        raise ModelVerificationFailed(f"cannot read model file {path}: {why_unreachable(exc)}") from None
    finally:
        os.close(fd)


def check(path: Path) -> Header:
    """The integrity check: a GGUF we can read, at least as long as its own tensor table says."""
    header = read_header(path)
    size = path.stat().st_size
    if size < header.required_size:
        raise ModelVerificationFailed(
            f"model file is truncated: {path} is {size} bytes but its GGUF header needs {header.required_size}",
            hint="the copy or download was interrupted: delete the file and fetch it again (`wrapper fetch`)",
        )
    return header


def tensor_nbytes(ne: list[int], ttype: int) -> int:
    constants = _gguf_constants()
    try:
        block, type_size = constants.GGML_QUANT_SIZES[constants.GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise _Bad(f"unknown ggml tensor type {ttype}") from None
    n = 1
    for d in ne:
        n *= d
    return int(n // block * type_size)


@functools.cache
def _gguf_constants() -> Any:
    """The `gguf` package's constants module without the package: importing `gguf` pulls in numpy and
    its readers (~0.17 s), and the check runs on every `wrapper serve` start. constants.py imports
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
