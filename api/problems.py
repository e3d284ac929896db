"""One exception handler: every error leaves as RFC 9457 problem+json with the right status.

SQL functions raise SQLSTATE ND<status> with the problem type in CONSTRAINT and the field in COLUMN
(docs/errors.md); Litestar's own errors (validation, 401, 404, 405, 413) are mapped here too.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
import psycopg
import psycopg.errors
import psycopg_pool
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.utils.scope.state import ScopeState

from api.schemas import Problem

log = logging.getLogger("api")
MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "urn:notification-dispatcher:problem:"
_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}
_encode = msgspec.json.Encoder().encode


class ProblemException(HTTPException):
    """Raised by handlers for errors that do not come from SQL."""

    def __init__(self, status: int, type_: str, detail: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.type_ = type_
        self.field = field


def problem(
    request: Request[Any, Any, Any] | None,
    status: int,
    type_: str,
    detail: str | None,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    body = Problem(
        type=TYPE_BASE + type_,
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        field=field or None,
        instance=request.url.path if request is not None else None,
    )
    return Response(content=_encode(body), status_code=status, media_type=MEDIA_TYPE, headers=headers)


_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]+)`")
_MISSING = re.compile(r"missing required field `(?P<name>[^`]+)`")


def _validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    """Litestar gives msgspec's message and the path ("recipient.addresses.whatsapp"); a missing or
    unknown member's name is only in the message, so it is appended to the path."""
    extra = exc.extra[0] if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict) else {}
    message = str(extra.get("message") or exc.detail)
    key = extra.get("key") if isinstance(extra.get("key"), str) else ""
    key = "" if key == "data" else key.removeprefix("data.")  # the body itself is "data"
    if not extra and message in ("'data'", "data"):
        return problem(request, 400, "invalid_request", "the request body is missing or is not a JSON object", None)
    named = _UNKNOWN.search(message) or _MISSING.search(message)
    field = ".".join(p for p in (key, named.group("name") if named else "") if p) or None
    if field and extra.get("source") == "header":
        field = key
    return problem(request, 400, "unknown_field" if _UNKNOWN.search(message) else "invalid_request", message, field)


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def batch_item_error(message: str, index: int) -> dict[str, Any]:
    """A batch item that failed msgspec's check, as its entry in the batch answer. The field is named within the
    item's notification, as notify_api.submit_notifications_v1 names it for a direct SQL caller ("colour",
    "recipient.addresses.email"); "notification" or "idempotency_key" when the item itself has the wrong shape."""
    at = _AT.search(message)
    path = at.group("path").removeprefix(".") if at else ""
    detail = _AT.sub("", message)
    named = _UNKNOWN.search(detail) or _MISSING.search(detail)
    parts = [p for p in (path, named.group("name") if named else "") if p]
    field = ".".join(parts)
    if field != "notification":
        field = field.removeprefix("notification.") if field.startswith("notification.") else (field or "notification")
    return {
        "index": index,
        "outcome": "error",
        "status": 400,
        "error": {
            "type": "unknown_field" if _UNKNOWN.search(detail) else "invalid_request",
            "detail": detail[:300],
            "field": field,
        },
    }


def _body_is_not_utf8(request: Request[Any, Any, Any]) -> bool:
    """Whether the body Litestar read is not UTF-8. Decided from the bytes, not from the decoder's error: msgspec
    and Litestar have raised UnicodeDecodeError, msgspec.DecodeError and a plain 400 for it in different versions."""
    body = ScopeState.from_scope(request.scope).body
    if not isinstance(body, bytes):
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if isinstance(exc, ProblemException):
        return problem(request, exc.status_code, exc.type_, exc.detail, exc.field, exc.headers)
    decoding = isinstance(exc, (UnicodeDecodeError, msgspec.DecodeError)) or (
        isinstance(exc, HTTPException) and exc.status_code == 400
    )
    if decoding and _body_is_not_utf8(request):
        return problem(request, 400, "invalid_encoding", "the body is not valid UTF-8", None)
    if isinstance(exc, ValidationException):
        return _validation(request, exc)
    if isinstance(exc, (msgspec.DecodeError, RecursionError)):
        detail = (
            "JSON nested too deeply"
            if isinstance(exc, RecursionError) or "nest" in str(exc).lower()
            else f"malformed JSON: {exc}"
        )
        return problem(request, 400, "invalid_json", detail[:300], None)
    if isinstance(exc, psycopg.Error) and exc.sqlstate and exc.sqlstate.startswith("ND"):
        diag = exc.diag
        headers = {"Retry-After": "1"} if exc.sqlstate == "ND429" else None
        return problem(
            request, int(exc.sqlstate[2:]), diag.constraint_name or "error", diag.message_primary, diag.column_name, headers
        )
    if isinstance(exc, psycopg.errors.DataError):
        return problem(request, 400, "invalid_value", exc.diag.message_primary, exc.diag.column_name)
    if isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout)):
        log.warning("database unavailable", extra={"error": type(exc).__name__, "path": request.url.path})
        return problem(
            request, 503, "database_unavailable", "the database is not reachable; retry shortly", None, {"Retry-After": "2"}
        )
    if isinstance(exc, HTTPException):
        status = exc.status_code
        slug = {
            401: "unauthorized",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
            429: "rate_limited",
        }.get(status, "http_error")
        return problem(request, status, slug, exc.detail, None, exc.headers)
    log.exception("unhandled error", extra={"path": request.url.path})
    return problem(request, 500, "internal_error", "an unexpected error occurred", None)
