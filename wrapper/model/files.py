"""Local model files: split-file names, a stat that never blocks, and the one sha256 cache.

One owner each (issue 11): acquisition, the GGUF reader and the tuning store's model identity all use these,
so a shard list, a "not a regular file" verdict or a file's hash can never disagree between them.

The sha256 cache is a marker beside the file (`.<name>.verified.json`: sha256, size, mtime and where the
bytes came from). Touching or replacing the file invalidates it. When the model folder is read-only the
hash may be kept in a spare folder instead (the state dir), keyed by path, size and mtime.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import time
from pathlib import Path

from wrapper.errors import ConfigError, ModelUnavailable

log = logging.getLogger("wrapper.acquire")

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_CHUNK = 1 << 20


def shard_names(filename: str, setting: str = "llamacpp.hf_filename") -> list[str]:
    """All shards of a split GGUF (`x-00001-of-00003.gguf`) in order; `[filename]` when not split.

    A name llama.cpp could never have written is an error, not a guess: `x-00002-of-00001.gguf` used to
    serve `x-00001-of-00001.gguf` silently, and `-of-00000` gave a traceback (issue 15 item 11).
    """
    m = _SHARD.match(filename)
    if not m:
        return [filename]
    no, count = int(m["no"]), int(m["count"])
    if count < 1 or not 1 <= no <= count:
        raise ConfigError(
            f"{setting}: {filename!r} is not a valid split-file name: shard {no} of {count}",
            hint="split GGUFs are named NAME-0000i-of-0000N.gguf with 1 <= i <= N; name any one of the shards",
        )
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def regular_file(path: Path) -> os.stat_result | None:
    """stat() of a model file: None when it does not exist, ModelUnavailable (one line) when it is not a
    regular file or cannot be reached. Never opens it: a FIFO at model_path hung the start for ever."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"model file {path}: {why_unreachable(exc)}",
                               hint="point llamacpp.model_path / model_root at a readable .gguf file") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device or socket"
        raise ModelUnavailable(f"model file {path} is {kind}, not a regular file",
                               hint="point llamacpp.model_path / model_root at a .gguf file")
    return st


def why_unreachable(exc: BaseException) -> str:
    """An OSError in words, without the errno soup; ValueError is an embedded NUL byte."""
    if not isinstance(exc, OSError):
        return "the path is not valid (it contains a NUL byte)"
    reasons = {
        errno.ENOTDIR: "a parent in the path is not a directory",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
        errno.ENAMETOOLONG: "the name is too long",
    }
    return reasons.get(exc.errno or 0) or exc.strerror or type(exc).__name__


# ---- the sha256 cache -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def marker_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified.json")


def read_marker(path: Path, st: os.stat_result) -> dict[str, object] | None:
    """The marker of `path` when it still describes these bytes (same size and mtime), else None."""
    try:
        data = json.loads(marker_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        return None
    if data.get("size") != st.st_size or data.get("mtime_ns") != st.st_mtime_ns:
        return None
    return data


def write_marker(path: Path, sha: str, st: os.stat_result, **origin: str | None) -> bool:
    """Record the hash (and where the bytes came from); False when the folder is read-only."""
    body = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "file": path.name, **origin,
            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = marker_path(path).with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, marker_path(path))
    except OSError as exc:
        log.info("cannot record the verified marker for %s (%s); it will be re-hashed next start", path.name, exc)
        return False
    return True


def cached_sha256(path: Path, spare_dir: Path | None = None) -> str:
    """The file's sha256, hashed at most once per (size, mtime). Raises OSError when it cannot be read."""
    st = path.stat()
    marker = read_marker(path, st)
    if marker is not None:
        return str(marker["sha256"])
    stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    spare = spare_dir / f"sha256-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}" if spare_dir else None
    if spare is not None and spare.is_file():
        return spare.read_text().strip()
    started = time.monotonic()
    digest = sha256_file(path)
    log.info("hashed %s (%.1f MB) in %.1fs", path.name, st.st_size / 1e6, time.monotonic() - started)
    if not write_marker(path, digest, st) and spare is not None:
        try:
            spare.parent.mkdir(parents=True, exist_ok=True)
            tmp = spare.with_name(f".{spare.name}.{os.getpid()}.tmp")
            tmp.write_text(digest)
            os.replace(tmp, spare)
        except OSError:
            pass  # a read-only state dir costs a re-hash next time, nothing more
    return digest
