"""A local HTTP server that speaks the Hugging Face Hub's file protocol, with faults it can inject.

Point `HF_ENDPOINT` (or `endpoint=` of huggingface_hub calls) at `hub.url`. It serves:

- `HEAD|GET /{repo}/resolve/{revision}/{file}`: `X-Repo-Commit`, `ETag`; for LFS files (the default for
  added files) also `X-Linked-Etag` (the file's sha256) and `X-Linked-Size`, and, like the real Hub, a 302
  to a "CDN" URL on another origin (`http://localhost:PORT/_lfs/{sha256}`) that serves the bytes.
  `Range: bytes=a-b | a- | -n` -> 206 with Content-Range.
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}`: `{"id", "sha", "siblings": [...]}`.
- Errors carry `X-Error-Code` the way the Hub does: unknown repo -> 401 `RepoNotFound`, unknown revision
  -> 404 `RevisionNotFound`, unknown file -> 404 `EntryNotFound`, gated repo -> 401 (no token) / 403
  (wrong token) `GatedRepo`.

Usage::

    with HubServer() as hub:                       # or the `hub` pytest fixture (tests/hub_fixtures.py)
        hub.add_file("org/tiny", "tiny.gguf", path_or_bytes)   # revision="main", lfs=True
        hub.faults.drop_at = 4096                  # close the connection once the body reaches offset 4096
        hub.faults.times = 1                       # ...on the first body request only (None = every one)
        os.environ["HF_ENDPOINT"] = hub.url

Faults (`hub.faults`, applied to body requests of LFS or plain files; all offsets are file offsets):
`drop_at`, `flip_at` (one byte xor 0xFF), `stall_at` + `stall_s` (send nothing for that long),
`size_delta` (advertised size is off by this many bytes), `status` (every request answers this code),
`ignore_range` (answer 200 with the whole file), `throttle_s` (pause per 64 kB chunk), and `times`
(how many body requests the body faults hit). `busy` + `busy_times`: the next `busy_times` requests of any
kind (metadata HEADs and API calls included) answer `busy` (503, 429, ...) with a Retry-After of 0.
`hub.requests` records (method, path, Range header, Authorization present) for assertions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>.+?)(?:/revision/(?P<rev>[^/]+))?$")
_LFS = re.compile(r"^/_lfs/(?P<sha>[0-9a-f]{64})$")
_CHUNK = 64 * 1024


@dataclass
class Faults:
    drop_at: int | None = None
    flip_at: int | None = None
    stall_at: int | None = None
    stall_s: float = 30.0
    size_delta: int = 0
    status: int | None = None
    ignore_range: bool = False
    throttle_s: float = 0.0  # sleep before each 64 kB chunk (a slow link, for overlap tests); not counted in times
    times: int | None = None  # body faults hit this many body requests, then stop (None: all of them)
    busy: int | None = None  # a transient status (5xx/429) for the next busy_times requests
    busy_times: int = 0
    hits: int = 0  # body requests a fault was applied to

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def active(self) -> bool:
        return self.times is None or self.hits < self.times


@dataclass
class HubFile:
    name: str
    source: bytes | Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) in chunks."""
        if isinstance(self.source, bytes):
            for pos in range(start, end, _CHUNK):
                yield self.source[pos : min(end, pos + _CHUNK)]
            return
        with self.source.open("rb") as fh:
            fh.seek(start)
            pos = start
            while pos < end:
                chunk = fh.read(min(_CHUNK, end - pos))
                if not chunk:
                    return
                pos += len(chunk)
                yield chunk


@dataclass
class Repo:
    revisions: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # name -> files
    gated_token: str | None = None


def commit_of(repo: str, revision: str) -> str:
    """The (fake, stable) commit hash a repo's revision resolves to."""
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


class HubServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.requests: list[tuple[str, str, str | None, bool]] = []
        self.redirect = True  # LFS files: resolve answers 302 to /_lfs/{sha256}, as the Hub sends to its CDN
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def cdn_url(self) -> str:
        """The same server under another origin, so clients treat it like the Hub's CDN (no auth forwarded)."""
        return f"http://localhost:{self._server.server_address[1]}"

    def add_file(
        self, repo: str, filename: str, data: bytes | str | Path, revision: str = "main", lfs: bool = True
    ) -> HubFile:
        source: bytes | Path = data if isinstance(data, bytes) else Path(data)
        blob = source if isinstance(source, bytes) else source.read_bytes()
        git = hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()
        entry = HubFile(filename, source, len(blob), hashlib.sha256(blob).hexdigest(), git, lfs)
        with self._lock:
            r = self.repos.setdefault(repo, Repo())
            r.revisions.setdefault(revision, {})[filename] = entry
        return entry

    def gate(self, repo: str, token: str) -> None:
        """Make `repo` gated: only `Authorization: Bearer <token>` gets in."""
        self.repos.setdefault(repo, Repo()).gated_token = token

    def body_requests(self) -> list[tuple[str, str, str | None, bool]]:
        return [r for r in self.requests if r[0] == "GET" and not r[1].startswith("/api/")]

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes stalled responses
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Lookups used by the handler.
    def find_revision(self, repo: str, rev: str) -> dict[str, HubFile] | None:
        r = self.repos.get(repo)
        if r is None:
            return None
        if rev in r.revisions:
            return r.revisions[rev]
        for name, files in r.revisions.items():
            if commit_of(repo, name) == rev:
                return files
        return None

    def find_lfs(self, sha: str) -> HubFile | None:
        for r in self.repos.values():
            for files in r.revisions.values():
                for f in files.values():
                    if f.sha256 == sha:
                        return f
        return None


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests assert on hub.requests
            pass

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def _dispatch(self, head: bool) -> None:
            path = urlsplit(self.path).path
            auth = self.headers.get("Authorization")
            hub.requests.append((self.command, path, self.headers.get("Range"), auth is not None))
            if hub.faults.status is not None:
                return self._error(hub.faults.status, "", "injected fault")
            if hub.faults.busy is not None and hub.faults.busy_times > 0:
                hub.faults.busy_times -= 1
                return self._error(hub.faults.busy, "", "injected transient fault")
            if m := _API.match(path):
                return self._api(unquote(m["repo"]), unquote(m["rev"] or "main"), head)
            if m := _LFS.match(path):
                f = hub.find_lfs(m["sha"])
                if f is None:
                    return self._error(404, "", "no such object")
                return self._body(f, head, {})
            if m := _RESOLVE.match(path):
                return self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), head)
            self._error(404, "", "not a hub route")

        def _gate(self, repo: str) -> bool:
            r = hub.repos.get(repo)
            if r is None or r.gated_token is None:
                return True
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo", "Access to model is restricted. You must be authenticated.")
                return False
            if auth != f"Bearer {r.gated_token}":
                self._error(403, "GatedRepo", "Access to model is restricted and you are not in the authorized list.")
                return False
            return True

        def _lookup(self, repo: str, rev: str) -> dict[str, HubFile] | None:
            if repo not in hub.repos:
                # The Hub cannot tell "private" from "missing" without credentials: both are 401.
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if not self._gate(repo):
                return None
            files = hub.find_revision(repo, rev)
            if files is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return files

        def _api(self, repo: str, rev: str, head: bool) -> None:
            files = self._lookup(repo, rev)
            if files is None:
                return
            doc = {
                "id": repo,
                "modelId": repo,
                "sha": commit_of(repo, rev if rev in hub.repos[repo].revisions else "main"),
                "siblings": [{"rfilename": name} for name in sorted(files)],
                "private": False,
                "gated": hub.repos[repo].gated_token is not None and "manual",
            }
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _resolve(self, repo: str, rev: str, filename: str, head: bool) -> None:
            files = self._lookup(repo, rev)
            if files is None:
                return
            f = files.get(filename)
            if f is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist on {rev!r}")
            commit = rev if len(rev) == 40 and rev not in hub.repos[repo].revisions else commit_of(repo, rev)
            meta = {"X-Repo-Commit": commit}
            if not f.lfs:
                meta["ETag"] = f'"{f.git_sha1}"'
                return self._body(f, head, meta)
            meta["X-Linked-Etag"] = f'"{f.sha256}"'
            meta["X-Linked-Size"] = str(f.size + hub.faults.size_delta)
            meta["ETag"] = f'"{f.sha256}"'
            if hub.redirect:
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/_lfs/{f.sha256}")
                for k, v in meta.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._body(f, head, meta)

        def _body(self, f: HubFile, head: bool, meta: dict[str, str]) -> None:
            faults = hub.faults
            advertised = f.size + faults.size_delta
            start, end = 0, f.size
            rng = self.headers.get("Range")
            partial = False
            if rng and not faults.ignore_range:
                parsed = _parse_range(rng, f.size)
                if parsed is None:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{f.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = parsed
                partial = True
            self.send_response(206 if partial else 200)
            for k, v in meta.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{f.size}")
                length = end - start
            else:
                # size_delta makes the body itself the wrong length (the advertised size lies consistently).
                end = min(f.size, advertised) if faults.size_delta < 0 else f.size
                length = end - start
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if head:
                return
            apply = faults.active() and any(
                x is not None for x in (faults.drop_at, faults.flip_at, faults.stall_at)
            )
            if apply:
                faults.hits += 1
            pos = start
            for chunk in f.read(start, end):
                data = chunk
                if faults.throttle_s:
                    hub._stop.wait(faults.throttle_s)
                if apply:
                    data, stop = _inject(faults, pos, data, hub._stop)
                    if stop:
                        if data:
                            self.wfile.write(data)
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.close()
                        return
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                pos += len(chunk)

        def _error(self, code: int, error_code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(code)
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _inject(faults: Faults, pos: int, chunk: bytes, stop: threading.Event) -> tuple[bytes, bool]:
    """Apply body faults to the chunk at file offset `pos`; True = close the connection after `chunk`."""
    end = pos + len(chunk)
    if faults.flip_at is not None and pos <= faults.flip_at < end:
        i = faults.flip_at - pos
        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
    if faults.stall_at is not None and pos <= faults.stall_at < end:
        stop.wait(faults.stall_s)
        return chunk[: faults.stall_at - pos], True
    if faults.drop_at is not None and pos <= faults.drop_at < end:
        return chunk[: faults.drop_at - pos], True
    return chunk, False


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-`, `bytes=-n` -> [start, end) within the file; None when unsatisfiable."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (m[1] == "" and m[2] == ""):
        return None
    if m[1] == "":
        n = int(m[2])
        return (max(0, size - n), size) if n > 0 and size > 0 else None
    start = int(m[1])
    end = int(m[2]) + 1 if m[2] else size
    if start >= size or end <= start:
        return None
    return start, min(end, size)
