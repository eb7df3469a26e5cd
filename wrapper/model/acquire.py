"""Finding, downloading and verifying GGUF files.

Resolution: `model_path` -> `model_root/hf_filename` -> download from the Hub into `model_root`. Nothing
reaches llama-server unverified: every file passes the GGUF header check (wrapper/model/gguf_header.py),
and its size and SHA-256 are checked against the profile's `sha256` or the Hub's LFS metadata
(X-Linked-Etag) whenever either is known, also in a read-only folder. huggingface_hub does not hash
downloads (a flipped byte is accepted silently), so we do. The verified marker beside the file
(wrapper/model/files.py: sha256, size, mtime, repo, revision, commit) lets restarts skip the Hub and the
re-hash of multi-GB files, but only for the same repo and revision: changing hf_repo_id or hf_revision
used to serve the old bytes as `(verified-cache)` (issue 15 item 7).

Downloads go to a partial name beside the target and are renamed into place once verified, under a file
lock, so two wrappers sharing a cache download once and no reader ever sees a partial file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from wrapper.errors import ConfigError, Interrupted, ModelUnavailable, ModelVerificationFailed
from wrapper.model.files import (
    cached_sha256,
    marker_path,
    read_marker,
    regular_file,
    sha256_file,
    shard_names,
    why_unreachable,
    write_marker,
)
from wrapper.model.gguf_header import check as check_header
from wrapper.model.transfer import Progress, Transfer, TransferFailed, fetch
from wrapper.profiles.schema import ModelSource
from wrapper.settings import Settings

if TYPE_CHECKING:
    # huggingface_hub costs ~0.1 s to import: only a start that talks to the Hub pays for it.
    from wrapper.model.hub import Hub, RemoteFile

log = logging.getLogger("wrapper.acquire")

__all__ = ["ModelFile", "Options", "companion", "ensure", "expected_path", "marker_path", "sha256_file",
           "shard_names"]
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
        try:
            return Path(spec.model_path).expanduser()
        except RuntimeError:  # `~someone/x` for a user that does not exist
            raise ConfigError(f"llamacpp.model_path: cannot expand {spec.model_path!r}: no such home directory",
                              hint="write the path out in full") from None
    if not spec.hf_filename:
        raise ConfigError(
            "llamacpp: no model: set model_path, or hf_repo_id + hf_filename",
            hint="e.g. hf_repo_id: Qwen/Qwen2.5-0.5B-Instruct-GGUF, hf_filename: qwen2.5-0.5b-instruct-q4_k_m.gguf",
        )
    return Path(spec.model_root).expanduser() / spec.hf_filename


def companion(s: Settings, source: ModelSource) -> Settings:
    """The settings under which a second file (llamacpp.mmproj, llamacpp.draft) is located, downloaded and
    verified: the model's own, with the file fields swapped. So a projector or draft model takes exactly the
    model's path (marker, lock, resume, Hub checks, move-aside), with no second copy of that logic."""
    spec = s.server
    same_repo = source.hf_repo_id in (None, spec.hf_repo_id)
    fields = {
        "model_path": source.path,
        "hf_repo_id": (source.hf_repo_id or spec.hf_repo_id) if source.hf_filename else None,
        "hf_filename": source.hf_filename,
        "hf_subfolder": source.hf_subfolder if source.hf_repo_id or source.hf_subfolder else spec.hf_subfolder,
        "hf_revision": source.hf_revision or (spec.hf_revision if same_repo else None),
        "sha256": source.sha256,
    }
    return replace(s, profile=s.profile.model_copy(update={"llamacpp": spec.model_copy(update=fields)}))


def ensure(s: Settings, options: Options | None = None) -> ModelFile:
    """Make sure the model is on disk and verified; return what llama-server should load."""
    opts = options or Options()
    first = expected_path(s)
    setting = "llamacpp.model_path" if s.server.model_path else "llamacpp.hf_filename"
    paths = [first.with_name(n) for n in shard_names(first.name, setting)]
    spec = s.server
    pinned = spec.sha256 if len(paths) == 1 else None
    if spec.sha256 and len(paths) > 1:
        log.warning("llamacpp.sha256 is ignored for split model %s: each shard is checked on its own", first.name)
    can_download = not spec.model_path and bool(spec.hf_repo_id)
    origin = _Origin(spec.hf_repo_id, spec.hf_revision or "main") if can_download else _Origin(None, None)

    missing = [p for p in paths if regular_file(p) is None]  # raises for a FIFO, a loop, EACCES, ...
    fast = [_fast_path(p, pinned, origin) for p in paths]
    if all(v is not None for v in fast):
        return _model_file(paths, [v for v in fast if v is not None])
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
        return _model_file(paths, [_verify_strict(p, pinned, None, origin) for p in paths])
    from wrapper.model.hub import Hub

    hub = Hub.from_settings(s, opts.transfer.stall_s, opts.transfer.backoff_s)
    if not missing and not os.access(first.parent, os.W_OK):
        # A read-only model volume (hand-filled cache): nothing can be replaced, but the Hub still says what
        # the bytes must be; a flipped byte used to pass as `(local)` here (issue 15 item 8).
        verified = []
        for p in paths:
            remote = _remote_or_none(hub, p)
            origin_p = origin.at(remote) if remote else _Origin(None, None)
            verified.append(_verify_strict(p, pinned or (remote.sha256 if remote else None),
                                           remote.size if remote else None, origin_p))
        return _model_file(paths, verified)
    try:
        first.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelUnavailable(
            f"cannot create the model directory {first.parent}: {why_unreachable(exc)}",
            hint="mount a writable volume there, or point LLM_CACHE_DIR / llamacpp.model_root elsewhere",
        ) from None
    verified = []
    with _locked(first, opts.lock_timeout_s):
        # Re-check under the lock: the process we waited for has usually just verified these files.
        todo = [p for p in paths if _fast_path(p, pinned, origin) is None]
        remotes = {p: _remote_or_none(hub, p) for p in todo}
        _check_disk(first.parent, [r for p, r in remotes.items() if r is not None and not p.exists()])
        for p in paths:
            remote = remotes.get(p)
            done = _fast_path(p, pinned, origin) if p not in remotes else None
            if done is None and p.exists():
                if remote is None:  # the Hub cannot be asked: the pinned hash (if any) is all we know
                    done = _verify_strict(p, pinned, None, _Origin(None, None))
                else:
                    done = _verify_or_move(p, pinned or remote.sha256, remote.size, origin.at(remote))
            if done is None:
                if remote is None:
                    hub.metadata(p.name)  # raises the reachability/access/404 error for the missing file
                    raise AssertionError("unreachable")
                done = _download(hub, remote, p, pinned, opts, origin=origin.at(remote))
            verified.append(done)
    return _model_file(paths, verified)


@dataclass(frozen=True)
class _Origin:
    """Where verified bytes came from, as the marker records it: the fast path needs the same repo and
    revision (None, None: a local file, verified against a pinned hash at most)."""

    repo: str | None
    revision: str | None
    commit: str | None = None

    def at(self, remote: RemoteFile) -> _Origin:
        return _Origin(self.repo, self.revision, remote.commit)

    def fields(self) -> dict[str, str | None]:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit}


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


def _fast_path(path: Path, pinned: str | None, origin: _Origin) -> _Verified | None:
    """A file verified before, untouched since (the marker binds size and mtime), from the same repo and
    revision. Its header was checked when it was verified, so a start does not parse it again (0.14 s for a
    150k-token vocabulary, on every start, for nothing)."""
    st = regular_file(path)
    marker = read_marker(path, st) if st is not None else None
    if st is None or marker is None:
        return None
    if (marker.get("file"), marker.get("repo"), marker.get("revision")) != (path.name, origin.repo, origin.revision):
        return None
    sha = str(marker["sha256"])
    if pinned is not None and pinned != sha:
        return None
    return _Verified(sha, st.st_size, "verified-cache")


def _local(path: Path, expected: str | None, size: int | None) -> tuple[os.stat_result, str, str]:
    """Header check, then the hash (from the sha256 cache when size and mtime still match) and what is
    wrong with it, or ""."""
    st = regular_file(path)
    if st is None:
        raise ModelUnavailable(f"model file not found: {path}")
    check_header(path)
    try:
        sha = cached_sha256(path)
    except OSError as exc:
        raise ModelVerificationFailed(f"cannot read model file {path}: {why_unreachable(exc)}") from None
    return st, sha, _mismatch(st.st_size, size if size is not None else st.st_size, sha, expected)


def _verify_strict(path: Path, expected: str | None, size: int | None, origin: _Origin) -> _Verified:
    """A file that cannot be replaced: any problem is the user's to fix (exit 3)."""
    st, sha, problem = _local(path, expected, size)
    if problem:
        raise ModelVerificationFailed(
            f"model file {path}: {problem}",
            hint="replace the file with the expected one (delete it to re-download), or fix llamacpp.sha256",
        )
    write_marker(path, sha, st, **origin.fields())
    return _Verified(sha, st.st_size, "local")


def _verify_or_move(path: Path, expected: str | None, size: int, origin: _Origin) -> _Verified | None:
    """A file the Hub can replace: a bad one is moved aside (None) and downloaded again."""
    try:
        st, sha, problem = _local(path, expected, size)
    except ModelVerificationFailed as exc:
        _move_aside(path, exc.message)
        return None
    if problem:
        _move_aside(path, problem + " (the Hub's copy)")
        return None
    write_marker(path, sha, st, **origin.fields())
    return _Verified(sha, st.st_size, "local")


class _locked:
    """The per-file download lock, with a log line when another process holds it."""

    def __init__(self, target: Path, timeout_s: float) -> None:
        lock_dir = target.parent / ".locks"
        try:
            lock_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise ModelUnavailable(f"cannot write {target.parent}: {why_unreachable(exc)}") from None
        self.path = lock_dir / f"{target.name}.lock"
        import filelock  # only a download takes the lock: a start from the verified cache does not import it

        self._timeout = filelock.Timeout
        self.lock = filelock.FileLock(str(self.path))
        self.target, self.timeout_s = target, timeout_s

    def __enter__(self) -> None:
        try:
            self.lock.acquire(timeout=0)
            return
        except self._timeout:
            pass
        log.info(
            "waiting up to %.0fs for another process fetching %s (lock %s)", self.timeout_s, self.target.name, self.path
        )
        try:
            self.lock.acquire(timeout=self.timeout_s)
        except self._timeout:
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


def _download(hub: Hub, remote: RemoteFile, target: Path, pinned: str | None, opts: Options, *,
              origin: _Origin) -> _Verified:
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
            with _stoppable():
                sha = fetch(remote.url, part, remote.size, headers=hub.auth_headers(), transfer=opts.transfer,
                            progress=progress, name=remote.filename)
        except TransferFailed as exc:
            raise ModelUnavailable(
                f"download of {remote.filename} from {hub.describe()} failed: {exc}",
                hint="check the network or HF_ENDPOINT; the partial file is kept and the next run resumes it",
            ) from None
        except OSError as exc:
            raise _disk_error(exc, target) from None
        except Interrupted:
            raise
        except Exception as exc:
            hub.raise_for(exc, remote.filename)
            raise
        size = part.stat().st_size
        problem = _mismatch(size, remote.size, sha, expected)
        if not problem:
            check_header(part)
            os.replace(part, target)
            write_marker(target, sha, target.stat(), **origin.fields())
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


class _Stop(BaseException):
    """SIGTERM arrived during a download (a BaseException, so no `except Exception` on the way swallows it)."""


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """SIGTERM (docker stop, timeout(1)) or Ctrl-C during a download ends it with one line and exit 130.
    SIGTERM used to kill the process by its default action: exit 143 and not a word (issue 15 item 22).
    The handler raises rather than records: the transfer blocks in a read that nothing else would end."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread; the default action stays
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    stopped = False
    try:
        yield
    except (_Stop, KeyboardInterrupt):
        stopped = True
        raise Interrupted("interrupted: download stopped, the partial file is kept for resume",
                          hint="run the same command again to resume the download") from None
    finally:
        # Once stopped the process is on its way out: a second SIGTERM (timeout(1) sends two) must not cut
        # the exit short with the default action.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if stopped else previous)


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
    return ModelUnavailable(f"cannot write {target.parent}: {why_unreachable(exc)}")
