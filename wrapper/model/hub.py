"""The Hub side of acquisition: token, file metadata (LFS sha256 and size), and errors in words.

Uses huggingface_hub for the protocol: `hf_hub_url`, `get_hf_file_metadata` (HEAD, reads X-Linked-Etag /
X-Linked-Size / X-Repo-Commit and stops at the CDN redirect) and its typed errors. The endpoint and token
come from Settings, never from huggingface_hub's own reading of the environment. The token is never put
into a message: errors name the variable to set, not its value.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from wrapper.errors import ConfigError, ModelUnavailable
from wrapper.model.transfer import HttpStatusError
from wrapper.settings import Settings

log = logging.getLogger("wrapper.acquire")

DEFAULT_ENDPOINT = "https://huggingface.co"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_META_TRIES = 3
# huggingface_hub 2.x speaks HTTP through httpx2 (its fork of httpx), so its network errors are httpx2's.
_NETWORK_ERRORS = (httpx.TransportError, httpx2.TransportError, OSError)


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    url: str  # the resolve URL; the downloader follows the redirect to the CDN
    size: int
    etag: str
    sha256: str | None  # LFS files: the etag is the content's sha256; plain git files have a sha1 etag
    commit: str | None


def read_token(s: Settings) -> str | None:
    """HF_TOKEN, else the file named by HF_TOKEN_FILE (a docker secret); checked before any request."""
    if s.env.hf_token is not None:
        return _checked_token(s.env.hf_token.reveal(), "HF_TOKEN")
    if not s.env.hf_token_file:
        return None
    try:
        token = Path(s.env.hf_token_file).read_text().strip()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            f"HF_TOKEN_FILE={s.env.hf_token_file}: cannot read it ({why})",
            hint="mount the secret there, or unset HF_TOKEN_FILE",
        ) from None
    return _checked_token(token, f"HF_TOKEN_FILE={s.env.hf_token_file}") or None


def _checked_token(token: str, where: str) -> str:
    """A token is one printable word. A second line in a token file used to reach the HTTP layer, whose
    error (`Illegal header value b'Bearer hf_...'`) printed the token (issue 15 item 4)."""
    token = token.strip()
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            f"{where}: the Hugging Face token contains whitespace, a line break or a control character",
            hint="a token is one word (hf_...): put only the token there, on one line",
        )
    return token


class Hub:
    def __init__(self, repo: str, revision: str, endpoint: str, token: str | None, timeout_s: float,
                 *, subfolder: str | None = None, backoff_s: float = 1.0) -> None:
        self.repo, self.revision, self.endpoint = repo, revision, endpoint.rstrip("/")
        self._token, self.timeout_s, self.subfolder = token, timeout_s, subfolder
        self.backoff_s = backoff_s

    @classmethod
    def from_settings(cls, s: Settings, timeout_s: float, backoff_s: float = 1.0) -> Hub:
        spec = s.server
        assert spec.hf_repo_id
        return cls(spec.hf_repo_id, spec.hf_revision or "main", s.env.hf_endpoint or DEFAULT_ENDPOINT,
                   read_token(s), timeout_s, subfolder=spec.hf_subfolder, backoff_s=backoff_s)

    def describe(self) -> str:
        where = "" if self.endpoint == DEFAULT_ENDPOINT else f" at {self.endpoint}"
        return f"{self.repo}@{self.revision}{where}"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def metadata(self, filename: str) -> RemoteFile:
        # Split files of big repos live in a folder; the local copy keeps the plain file name.
        url = hf_hub_url(self.repo, filename, subfolder=self.subfolder, revision=self.revision, endpoint=self.endpoint)
        for attempt in range(1, _META_TRIES + 1):
            try:
                meta = get_hf_file_metadata(url, token=self._token or False, timeout=self.timeout_s,
                                            endpoint=self.endpoint)
                break
            except HfHubHTTPError as exc:  # before OSError: it is one
                status = _status_of(exc)
                if attempt == _META_TRIES or status is None or (status != 429 and status < 500):
                    self.raise_for(exc, filename)
                why: object = f"HTTP {status}"
            except _NETWORK_ERRORS as exc:
                if attempt == _META_TRIES:
                    raise ModelUnavailable(
                        f"cannot reach the Hub at {self.endpoint} for {self.repo}/{filename}: {one_line(exc)}",
                        hint="check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 and copy the file",
                    ) from None
                why = one_line(exc)
            # 5xx and 429 are the Hub being busy, not an answer (issue 15 item 10): back off and ask again.
            wait = self.backoff_s * 2 ** (attempt - 1)
            log.warning("Hub metadata request for %s failed (%s); retrying in %.1fs", filename, why, wait)
            time.sleep(wait)
        if meta.size is None or meta.etag is None:
            raise ModelUnavailable(f"the Hub gave no size or ETag for {self.repo}/{filename}@{self.revision}")
        etag = meta.etag.strip('"').removeprefix("W/").strip('"')
        return RemoteFile(filename, url, meta.size, etag, etag if _SHA256.match(etag) else None, meta.commit_hash)

    def raise_for(self, exc: Exception, filename: str) -> NoReturn:
        """Turn a Hub error into a ModelUnavailable that says what to do."""
        status = _status_of(exc)
        if isinstance(exc, GatedRepoError) or status in (401, 403) or isinstance(exc, RepositoryNotFoundError):
            have = "the token given was refused" if self._token else "no token was given"
            raise ModelUnavailable(
                f"{self.repo}: access denied (HTTP {status}): the repo is gated, private or does not exist, "
                f"and {have}",
                hint="set HF_TOKEN (or HF_TOKEN_FILE) to a token whose account has accepted the model's terms "
                "on its Hub page; check llamacpp.hf_repo_id",
            ) from None
        if isinstance(exc, RevisionNotFoundError):
            raise ModelUnavailable(
                f"{self.repo}: revision {self.revision!r} not found (llamacpp.hf_revision)",
                hint="use a branch, tag or commit that exists, or unset hf_revision for main",
            ) from None
        if isinstance(exc, EntryNotFoundError) or status == 404:
            listing = self.gguf_files()
            if listing is None:
                hint = "check llamacpp.hf_filename against the repo's file list"
            elif listing:
                hint = "the repo has: " + ", ".join(listing)
            else:
                hint = "the repo has no .gguf files at this revision: is it the GGUF repo of this model?"
            raise ModelUnavailable(
                f"{self.repo} has no file {filename!r} at revision {self.revision!r} (llamacpp.hf_filename)",
                hint=hint,
            ) from None
        raise ModelUnavailable(
            f"Hub request for {self.repo}/{filename} failed: HTTP {status}: {one_line(exc)}"
        ) from None

    def gguf_files(self) -> list[str] | None:
        """The repo's .gguf files at this revision, or None when the API cannot tell."""
        try:
            info = HfApi(endpoint=self.endpoint, token=self._token or False).model_info(
                self.repo, revision=self.revision, timeout=self.timeout_s
            )
        except Exception as exc:  # the listing only improves a message; its failure must not replace it
            log.debug("cannot list %s: %s", self.repo, exc)
            return None
        return sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".gguf"))


def one_line(exc: BaseException) -> str:
    """An exception as one line: huggingface_hub's errors carry the server's body and a request id on
    further lines, and the CLI promises one line per error."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return text or type(exc).__name__


def _status_of(exc: Exception) -> int | None:
    if isinstance(exc, HttpStatusError):
        return exc.status
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
