"""What every route group shares: the documented error answers, the guarded tenant, and `sql_json`, the one way a
handler calls a notify_api function and answers with the JSON it built."""

from __future__ import annotations

import dataclasses
from typing import Any
from uuid import UUID

import msgspec
from litestar import Request, Response
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from api.db import Database
from api.problems import ProblemException
from api.schemas import Problem
from dispatcher.callback_urls import UnsafeUrl
from dispatcher.callback_urls import resolve as resolve_callback_url

JSON = "application/json"
# Every route may answer with a problem (RFC 9457); documented so clients and schema checkers expect it.
ERRORS = {
    status: ResponseSpec(
        data_container=Problem, media_type="application/problem+json", generate_examples=False, description=description
    )
    for status, description in {
        400: "Bad request: the body or a parameter is malformed; `field` names it",
        401: "Missing, unknown or revoked API key, or an unverified webhook",
        403: "Forbidden",
        404: "No such object for this tenant, or no such route",
        409: "Conflict",
        413: "Body too large",
        422: "Well-formed but refused; `field` names why",
        503: "The database is unavailable; retry after Retry-After seconds",
    }.items()
}
encode = msgspec.json.Encoder().encode


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: UUID
    key_id: UUID
    rate: float | None = None  # set when the route's own statement takes the rate token (opt charge="statement")


def json_response(text: str | None, status: int = 200, headers: dict[str, str] | None = None) -> Response[Any]:
    """JSON text as the body, as is (no decoding and encoding again); `null` for None."""
    return Response(content=(text or "null").encode(), status_code=status, media_type=JSON, headers=headers)


async def sql_json(
    db: Database, call: str, *args: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response[Any]:
    """Calls one notify_api function and answers with the JSON it returns: `call` is the function with a %s per argument
    (casts included, e.g. "notify_api.get_recipient_v1(%s, %s)"), run as `select <call>::text` in one round trip."""
    row = await db.one(f"select {call}::text", args)
    return json_response(row[0] if row else None, status, headers)


def unauthorized() -> ProblemException:
    return ProblemException(401, "unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})


def too_large(limit: int, setting: str) -> ProblemException:
    return ProblemException(413, "payload_too_large", f"the body is over {limit} bytes ({setting})")


async def body_text(request: Request[Any, Any, Any]) -> str:
    return (await request.body()).decode("utf-8")


async def check_callback_url(state: State, url: str | None, field: str) -> None:
    """SSRF: a callback URL must resolve to public addresses only (outside development mode); 422 names the field."""
    if url is not None:
        try:
            await resolve_callback_url(url, allow_private=state.settings.dev_mode)
        except UnsafeUrl as exc:
            raise ProblemException(422, "unsafe_callback_url", str(exc), field) from None
