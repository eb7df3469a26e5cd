"""Finding, downloading and verifying GGUF files.

Resolution: `model_path` -> `model_root/hf_filename` -> download from the Hub into `model_root`. Nothing
reaches llama-server unverified: every file passes the GGUF header check (wrapper/gguf_check.py), and its
size and SHA-256 are checked against the profile's `sha256` or the Hub's LFS metadata (X-Linked-Etag)
before first use. huggingface_hub does not hash downloads (a flipped byte is accepted silently), so we do.
A verified marker beside the file (`.<name>.verified.json`: sha256, size, mtime) lets restarts skip
re-hashing multi-GB files; touching or replacing the file invalidates it.

Downloads go to a partial name beside the target and are renamed into place once verified, under a file
lock, so two wrappers sharing a cache download once and no reader ever sees a partial file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import filelock

from wrapper.errors import ConfigError, ModelUnavailable, ModelVerificationFailed
from wrapper.model import gguf_check
from wrapper.model.transfer import Progress, Transfer, TransferFailed, fetch
from wrapper.settings import Settings

if TYPE_CHECKING:
    # huggingface_hub costs ~0.1 s to import: only a start that talks to the Hub pays for it.
    from wrapper.model.hub import Hub, RemoteFile

log = logging.getLogger("wrapper.acquire")

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_DISK_MARGIN = 64 * 1024 * 1024  # keep some room: a disk filled to the last byte breaks logs and SQLite


@dataclass(frozen=True)
class ModelFile:
    path: Path  # what llama-server gets: the file, or the first shard of a split GGUF
    shards: tuple[Path, ...] = ()
    sha256: str | None = None
    size: int = 0
    source: str = "local"  # local | downloaded | verified-cache
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    transfer: Transfer = field(default_factory=Transfer)
    lock_timeout_s: float = 3600.0  # a multi-GB download by another wrapper can take this long


def expected_path(s: Settings) -> Path:
    """Where the model file is (or will be once fetched): model_path, else model_root/hf_filename."""
    spec = s.server
    # `~` is expanded (profiles are written by hand); relative paths are relative to the working directory.
    if spec.model_path:
        return Path(spec.model_path).expanduser()
    if not spec.hf_filename:
        raise ConfigError(
            "llamacpp: no model: set model_path, or hf_repo_id + hf_filename",
            hint="e.g. hf_repo_id: Qwen/Qwen2.5-0.5B-Instruct-GGUF, hf_filename: qwen2.5-0.5b-instruct-q4_k_m.gguf",
        )
    return Path(spec.model_root).expanduser() / spec.hf_filename


def shard_names(filename: str) -> list[str]:
    """All shards of a split GGUF (`x-00001-of-00003.gguf`) in order; `[filename]` when not split."""
    m = _SHARD.match(filename)
    if not m:
        return [filename]
    count = int(m["count"])
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def ensure(s: Settings, options: Options | None = None) -> ModelFile:
    """Make sure the model is on disk and verified; return what llama-server should load."""
    opts = options or Options()
    first = expected_path(s)
    names = shard_names(first.name)
    paths = [first.with_name(n) for n in names]
    spec = s.server
    pinned = spec.sha256 if len(names) == 1 else None
    if spec.sha256 and len(names) > 1:
        log.warning("llamacpp.sha256 is ignored for split model %s: each shard is checked on its own", first.name)
    can_download = not spec.model_path and bool(spec.hf_repo_id)

    fast = [_fast_path(p, pinned) for p in paths]
    if all(v is not None for v in fast):
        return _model_file(paths, [v for v in fast if v is not None])
    missing = [p for p in paths if not p.exists()]
    if not can_download or s.env.hf_offline:
        if missing and not can_download:
            raise ModelUnavailable(
                f"model file not found: {missing[0]}",
                hint="copy the GGUF there, or set llamacpp.hf_repo_id + hf_filename so it can be downloaded",
            )
        if missing:
            raise ModelUnavailable(
                f"model file not found: {missing[0]}, and HF_HUB_OFFLINE=1 forbids downloading it",
                hint=f"copy it there, or unset HF_HUB_OFFLINE to download it from {spec.hf_repo_id}",
            )
        local = [_verify_local(p, pinned, None) for p in paths]
        return _model_file(paths, [v for v in local if v is not None])  # strict: None never comes back

    if not missing and not os.access(first.parent, os.W_OK):
        # A read-only model volume (hand-filled cache): nothing can be replaced, so verify what is there.
        local = [_verify_local(p, pinned, None) for p in paths]
        return _model_file(paths, [v for v in local if v is not None])
    from wrapper.model.hub import Hub

    hub = Hub.from_settings(s, opts.transfer.stall_s)
    try:
        first.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelUnavailable(
            f"cannot create the model directory {first.parent}: {exc.strerror or exc}",
            hint="mount a writable volume there, or point LLM_CACHE_DIR / llamacpp.model_root elsewhere",
        ) from None
    verified = []
    with _locked(first, opts.lock_timeout_s):
        # Re-check under the lock: the process we waited for has usually just verified these files.
        todo = [p for p in paths if _fast_path(p, pinned) is None]
        remotes = {p: _remote_or_none(hub, p) for p in todo}
        _check_disk(first.parent, [r for p, r in remotes.items() if r is not None and not p.exists()])
        for p in paths:
            remote = remotes.get(p)
            done = _fast_path(p, pinned) if p not in remotes else None
            if done is None and p.exists():
                expected = pinned or (remote.sha256 if remote else None)
                done = _verify_local(p, expected, remote.size if remote else None, strict=remote is None)
            if done is None:
                if remote is None:
                    hub.metadata(p.name)  # raises the reachability/access/404 error for the missing file
                    raise AssertionError("unreachable")
                done = _download(hub, remote, p, pinned, opts)
            verified.append(done)
    return _model_file(paths, verified)


def _remote_or_none(hub: Hub, path: Path) -> RemoteFile | None:
    """Hub metadata; for a file we already have, a Hub we cannot reach is not fatal (it is verified locally)."""
    if not path.exists():
        return hub.metadata(path.name)
    try:
        return hub.metadata(path.name)
    except ModelUnavailable as exc:
        log.warning("cannot check %s against the Hub (%s); verifying it locally", path.name, exc.message)
        return None


@dataclass(frozen=True)
class _Verified:
    sha256: str
    size: int
    source: str


def _model_file(paths: list[Path], verified: list[_Verified]) -> ModelFile:
    sources = {v.source for v in verified}
    source = "local"
    if "downloaded" in sources:
        source = "downloaded"
    elif sources == {"verified-cache"}:
        source = "verified-cache"
    return ModelFile(
        path=paths[0],
        shards=tuple(paths),
        sha256=verified[0].sha256,
        size=sum(v.size for v in verified),
        source=source,
    )


def marker_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified.json")


def _fast_path(path: Path, pinned: str | None) -> _Verified | None:
    """A file verified before and untouched since (marker matches size and mtime): header check only."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    marker = _read_marker(path)
    if not marker or marker.get("size") != st.st_size or marker.get("mtime_ns") != st.st_mtime_ns:
        return None
    sha = str(marker["sha256"])
    if pinned is not None and pinned != sha:
        return None
    gguf_check.read_header(path)
    return _Verified(sha, st.st_size, "verified-cache")


def _verify_local(path: Path, expected: str | None, size: int | None, strict: bool = True) -> _Verified | None:
    """Header check and hash of a local file. A mismatch raises when strict, else moves it aside (None)."""
    if not path.exists():
        raise ModelUnavailable(f"model file not found: {path}")
    st = path.stat()
    try:
        gguf_check.read_header(path)
    except ModelVerificationFailed as exc:
        if strict:
            raise
        _move_aside(path, exc.message)
        return None
    started = time.monotonic()
    sha = sha256_file(path)
    log.info("hashed %s (%.1f MB) in %.1fs", path.name, st.st_size / 1e6, time.monotonic() - started)
    problem = _mismatch(st.st_size, size if size is not None else st.st_size, sha, expected)
    if problem:
        if strict:
            raise ModelVerificationFailed(
                f"model file {path}: {problem}",
                hint="replace the file with the expected one (delete it to re-download), or fix llamacpp.sha256",
            )
        _move_aside(path, problem + " (the Hub's copy)")
        return None
    _write_marker(path, sha, st)
    return _Verified(sha, st.st_size, "local")


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(marker_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("sha256"), str) else None


def _write_marker(path: Path, sha: str, st: os.stat_result, commit: str | None = None) -> None:
    body = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "commit": commit,
            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = marker_path(path).with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, marker_path(path))
    except OSError as exc:
        # A read-only model directory is fine: we only lose the fast path and re-hash on the next start.
        log.info("cannot record the verified marker for %s (%s); it will be re-hashed next start", path.name, exc)


class _locked:
    """The per-file download lock, with a log line when another process holds it."""

    def __init__(self, target: Path, timeout_s: float) -> None:
        lock_dir = target.parent / ".locks"
        try:
            lock_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise ModelUnavailable(f"cannot write {target.parent}: {exc.strerror or exc}") from None
        self.path = lock_dir / f"{target.name}.lock"
        self.lock = filelock.FileLock(str(self.path))
        self.target, self.timeout_s = target, timeout_s

    def __enter__(self) -> None:
        try:
            self.lock.acquire(timeout=0)
            return
        except filelock.Timeout:
            pass
        log.info(
            "waiting up to %.0fs for another process fetching %s (lock %s)", self.timeout_s, self.target.name, self.path
        )
        try:
            self.lock.acquire(timeout=self.timeout_s)
        except filelock.Timeout:
            raise ModelUnavailable(
                f"gave up after {self.timeout_s:.0f}s waiting for another process to fetch {self.target}",
                hint=f"if no other wrapper is running, a stale lock is unusual: check {self.path}",
            ) from None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _check_disk(directory: Path, remotes: list[RemoteFile]) -> None:
    need = sum(max(r.size - _part_path(directory / r.filename, r).stat().st_size, 0)
               if _part_path(directory / r.filename, r).exists() else r.size for r in remotes)
    free = shutil.disk_usage(directory).free
    if free < need + _DISK_MARGIN:
        gb = 1024**3
        raise ModelUnavailable(
            f"not enough disk space in {directory}: the download needs {need / gb:.2f} GiB "
            f"(+{_DISK_MARGIN // 2**20} MiB margin), {free / gb:.2f} GiB free",
            hint="free space there, or point LLM_CACHE_DIR / llamacpp.model_root at a larger volume",
        )


def _part_path(target: Path, remote: RemoteFile) -> Path:
    # The expected hash is in the name so a partial file from another revision is never resumed.
    return target.with_name(f".{target.name}.{remote.sha256 or remote.etag}"[:240] + ".part")


def _download(hub: Hub, remote: RemoteFile, target: Path, pinned: str | None, opts: Options) -> _Verified:
    """Download, verify, rename into place; one more try after a bad file, then exit-3 error."""
    expected = pinned or remote.sha256
    if pinned and remote.sha256 and pinned != remote.sha256:
        log.warning(
            "llamacpp.sha256 %s differs from the Hub's sha256 %s for %s; the pinned value wins",
            pinned, remote.sha256, remote.filename,
        )
    part = _part_path(target, remote)
    problem = ""
    for attempt in (1, 2):
        log.info("downloading %s from %s (%.1f MB, revision %s)", remote.filename, hub.describe(),
                 remote.size / 1e6, remote.commit or hub.revision)
        progress = Progress(remote.filename, remote.size, opts.transfer.progress_every_s)
        try:
            sha = fetch(remote.url, part, remote.size, headers=hub.auth_headers(), transfer=opts.transfer,
                        progress=progress, name=remote.filename)
        except TransferFailed as exc:
            raise ModelUnavailable(
                f"download of {remote.filename} from {hub.describe()} failed: {exc}",
                hint="check the network or HF_ENDPOINT; the partial file is kept and the next run resumes it",
            ) from None
        except OSError as exc:
            raise _disk_error(exc, target) from None
        except Exception as exc:
            hub.raise_for(exc, remote.filename)
            raise
        size = part.stat().st_size
        problem = _mismatch(size, remote.size, sha, expected)
        if not problem:
            gguf_check.read_header(part)
            os.replace(part, target)
            _write_marker(target, sha, target.stat(), remote.commit)
            log.info("verified %s: sha256 %s, %d bytes", target.name, sha, size)
            return _Verified(sha, size, "downloaded")
        bad = _move_aside(part, problem, target)
        if attempt == 1:
            log.warning("%s: %s; moved it to %s and downloading once more", remote.filename, problem, bad.name)
    raise ModelVerificationFailed(
        f"{remote.filename} from {hub.describe()} failed verification twice: {problem}",
        hint="the download is corrupted in transit or the Hub's metadata changed; both bad copies are kept "
        "beside the target as *.bad-* for inspection",
    )


def _mismatch(size: int, expected_size: int, sha: str, expected_sha: str | None) -> str:
    if size != expected_size:
        return f"size is {size} bytes, expected {expected_size}"
    if expected_sha is not None and sha != expected_sha:
        return f"sha256 is {sha}, expected {expected_sha}"
    return ""


def _move_aside(path: Path, why: str, target: Path | None = None) -> Path:
    base = target or path
    stamp = f"{base.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    bad, n = base.with_name(stamp), 1
    while bad.exists():  # two bad copies within one second must both be kept
        n += 1
        bad = base.with_name(f"{stamp}-{n}")
    os.replace(path, bad)
    if target is None:
        marker_path(path).unlink(missing_ok=True)
        log.warning("moved %s aside to %s: %s", path, bad.name, why)
    return bad


def _disk_error(exc: OSError, target: Path) -> ModelUnavailable:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ModelUnavailable(
            f"disk full while downloading {target.name} into {target.parent}: {exc.strerror}",
            hint="free space there, or point LLM_CACHE_DIR / llamacpp.model_root at a larger volume; "
            "the partial file is kept and the next run resumes it",
        )
    return ModelUnavailable(f"cannot write {target.parent}: {exc.strerror or exc}")
