"""X-Request-ID: accepted from the caller (1-200 printable ASCII characters) or created, echoed in the response,
put on every log line of the request, and stored with a submitted notification so the worker's lines carry it too."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from dispatcher.logs import REQUEST_ID

HEADER = b"x-request-id"
_VALID = re.compile(rb"[\x21-\x7e]{1,200}")
log = logging.getLogger("api.access")


def current() -> str | None:
    return REQUEST_ID.get()


def _from_headers(headers: Any) -> str:
    for name, value in headers:
        if name == HEADER and _VALID.fullmatch(value):
            return str(value.decode("ascii"))
    return uuid.uuid4().hex


def middleware(app: ASGIApp) -> ASGIApp:
    """Pure ASGI (no per-request objects): binds the id, adds the response header, logs one line per request."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = _from_headers(scope["headers"])
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            REQUEST_ID.reset(token)

    return handle
