"""Logging: named loggers, text or JSON lines, and a filter that redacts secrets from every record."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wrapper.settings import Settings

# Token shapes that must never reach a log even when we were not told the value.
_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    re.compile(r"(?i)(authorization:\s*bearer\s+)\S+"),
    # A proxy or an HTTP library that quotes a refused header (`Illegal header value b'Bearer ...'`).
    re.compile(r"(?i)(\bbearer\s+)[^\s\"'\\]+"),
    re.compile(r"(?i)(--api-key[ =])\S+"),
    # Also inside JSON text: a quote may come escaped (`token=\"abc\"`). The value stops at a backslash
    # (an escaped pair is part of it), so the redaction neither eats the escape of a quote, which left
    # invalid JSON and the value itself behind it, nor leaves the rest of an escaped value (issue 15).
    re.compile(r"(?i)((?:api[_-]?key|token|password)(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'])?)(?:[^\s\"'\\,}]|\\\\)+"),
)


class Redactor(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Learn more values to hide (the CLI creates one redactor at its root, before the settings that
        name the secrets are read)."""
        self.secrets = sorted({*self.secrets, *(s for s in secrets if s and len(s) >= 4)}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # A traceback quotes exception messages (an HTTP error may quote the header it refused); the
            # formatters print exc_text when it is set.
            record.exc_text = self.redact(_TRACEBACK.formatException(record.exc_info))
        return True


_TRACEBACK = logging.Formatter()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_text:  # set, and redacted, by Redactor.filter
            payload["exc"] = record.exc_text
        elif record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def secrets_of(s: Settings) -> list[str]:
    out = []
    if s.env.hf_token is not None:
        out.append(s.env.hf_token.reveal())
    for path in (s.env.hf_token_file, s.server.api_key_file):
        if path:
            # An unreadable key file is reported where it is used, not here.
            with contextlib.suppress(OSError):
                out.extend(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    return out


def setup(fmt: str = "text", debug: bool = False, secrets: Iterable[str] = (),
          redactor: Redactor | None = None) -> Redactor:
    """Log to stderr through `redactor` (a new one when None) after teaching it `secrets`; returns it so the
    caller hands the same one to everything else that prints or serves text (child output, /status)."""
    redactor = redactor if redactor is not None else Redactor()
    redactor.add(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(redactor)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("wrapper")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    for noisy in ("httpx", "httpcore", "nats", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return redactor
