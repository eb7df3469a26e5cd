"""Streaming one file over HTTP into a partial file: Range resume, bounded retries, stall detection.

Why not `hf_hub_download` for the body: it takes its stall timeout from HF_HUB_DOWNLOAD_TIMEOUT, read
from the process environment when huggingface_hub is imported (a module constant, not a per-call
argument, and settings.py is our only reader of the environment); it hashes nothing, so verifying a
multi-GB file would cost a second full read; and it has no progress output for container logs. We still
use huggingface_hub for the Hub's protocol (URLs, HEAD metadata with X-Linked-Etag, typed errors). Here a
stall is httpx's read timeout: no byte for `stall_s` seconds, which is exactly "stalled".
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    pass

log = logging.getLogger("wrapper.acquire")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Transfer:
    stall_s: float = 60.0  # no byte for this long -> drop the connection and resume
    retries: int = 5  # consecutive failed attempts (no byte past the furthest point so far) before giving up
    max_attempts: int = 100  # requests in all, whatever the progress
    max_s: float = 24 * 3600.0  # the whole transfer, however it goes: a drip-feeding peer never stalls
    backoff_s: float = 1.0  # first wait; doubles, capped at 30 s
    progress_every_s: float = 5.0  # log line interval when stderr is not a terminal


class HttpStatusError(Exception):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}")
        self.status = status


class TransferFailed(Exception):
    """Retries exhausted; the message says why (the last error)."""


class Progress:
    """A bar on a terminal; a log line every few seconds (percent, MB/s, ETA) anywhere else."""

    def __init__(self, name: str, total: int, every_s: float, stream: TextIO | None = None) -> None:
        self.name, self.total, self.every_s = name, total, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.start_pos = 0
        self.last = 0.0

    def begin(self, pos: int) -> None:
        self.t0, self.start_pos = time.monotonic(), pos

    def update(self, pos: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else self.every_s):
            return
        self.last = now
        rate = (pos - self.start_pos) / max(now - self.t0, 1e-6)
        pct = 100.0 * pos / self.total if self.total else 100.0
        eta = (self.total - pos) / rate if rate > 0 else float("inf")
        eta_txt = f"{eta:.0f}s" if eta != float("inf") else "?"
        mb = 1024 * 1024
        text = (
            f"{self.name}: {pct:5.1f}% {pos / mb:.1f}/{self.total / mb:.1f} MB "
            f"{rate / mb:.1f} MB/s ETA {eta_txt}"
        )
        if self.tty:
            width = 24
            filled = int(width * pct / 100)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K" + ("\n" if final else ""))
            self.stream.flush()
        else:
            log.info("downloading %s", text)


def _sha_of(part: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with part.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h


def fetch(
    url: str, part: Path, size: int, *, headers: dict[str, str], transfer: Transfer, progress: Progress | None,
    name: str = "",
) -> str:
    """Download `url` into `part` (resuming what is there) and return the sha256 of what `part` holds.

    Stops at `size` bytes or when the server says the body is complete; a short or long body is the
    caller's to report (it compares size and hash). 4xx answers raise HttpStatusError at once.
    """
    name = name or part.name
    pos = part.stat().st_size if part.exists() else 0
    if pos > size:
        part.unlink()
        pos = 0
    hasher = _sha_of(part) if pos else hashlib.sha256()
    import httpx  # here, not at the top: a start from the verified cache never downloads

    timeout = httpx.Timeout(connect=transfer.stall_s, read=transfer.stall_s, write=transfer.stall_s, pool=5.0)
    failures = attempts = 0
    furthest = pos  # progress is bytes past this point: a peer that ignores Range and drops makes none
    deadline = time.monotonic() + transfer.max_s
    if progress:
        progress.begin(pos)
    with httpx.Client(follow_redirects=True, timeout=timeout) as client:
        while pos < size:
            attempts += 1
            request_headers = dict(headers, **({"Range": f"bytes={pos}-"} if pos else {}))
            try:
                with client.stream("GET", url, headers=request_headers) as response:
                    if response.status_code == 416:
                        break  # nothing past `pos`: the file is shorter than advertised
                    if response.status_code >= 400:
                        if response.status_code in (408, 429) or response.status_code >= 500:
                            raise httpx.TransportError(f"HTTP {response.status_code}")
                        raise HttpStatusError(response.status_code, url)
                    if pos and response.status_code == 200:
                        log.warning("%s: the server ignored the Range request; restarting from byte 0", name)
                        pos, hasher = 0, hashlib.sha256()
                    with part.open("r+b" if pos else "wb") as out:
                        out.seek(pos)
                        out.truncate()
                        for chunk in response.iter_bytes():  # as it arrives: a drop loses nothing
                            out.write(chunk)
                            hasher.update(chunk)
                            pos += len(chunk)
                            if progress:
                                progress.update(pos)
                            if pos > size:
                                break
                            if time.monotonic() > deadline:
                                raise TransferFailed(f"gave up after {transfer.max_s:g}s ({attempts} requests)")
                break  # the body ended cleanly; size and hash are checked by the caller
            except httpx.TransportError as exc:
                # Issue 15 item 9: a server that ignored Range and dropped at the same offset used to be
                # asked again from byte 0 for ever (60 GETs in 60 s); only new bytes count as progress.
                failures = 0 if pos > furthest else failures + 1
                furthest = max(furthest, pos)
                if failures >= transfer.retries:
                    raise TransferFailed(
                        f"{_why(exc, transfer)} ({failures} attempts in a row made no progress)"
                    ) from None
                if attempts >= transfer.max_attempts or time.monotonic() > deadline:
                    raise TransferFailed(
                        f"{_why(exc, transfer)}; gave up after {attempts} requests in "
                        f"{transfer.max_s - (deadline - time.monotonic()):.0f}s"
                    ) from None
                wait = min(transfer.backoff_s * 2 ** max(failures - 1, 0), 30.0)
                pct = f"{100 * pos / size:.0f}%" if size else "0%"
                why = _why(exc, transfer)
                log.warning("download of %s interrupted at %s (%s); resuming in %.1fs", name, pct, why, wait)
                time.sleep(wait)
    if progress:
        progress.update(pos, final=True)
    return hasher.hexdigest()


def _why(exc: Exception, transfer: Transfer) -> str:
    import httpx

    if isinstance(exc, httpx.ReadTimeout):
        return f"stalled: no data for {transfer.stall_s:g}s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {exc}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection dropped mid-transfer"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
