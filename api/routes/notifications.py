"""/internal/notifications: submit one intent (or a fan-out), a batch, read, cancel, and a notification's callbacks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar
from uuid import UUID

import msgspec
import psycopg
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from api import problems, request_ids
from api.db import Database
from api.problems import ProblemException
from api.routes.common import ERRORS, Tenant, check_callback_url, encode, json_response, sql_json, too_large, unauthorized
from api.schemas import (
    BatchIn,
    BatchItem,
    BatchOut,
    CallbackMessage,
    CancelResult,
    DeliveryPage,
    NotificationAccepted,
    NotificationIn,
    NotificationOut,
    NotificationPage,
)
from dispatcher import metrics, tracing
from dispatcher.settings import Settings

# One statement each, one round trip (sql/071_api_http.sql): the request's ids for the transaction, the submission, and
# the key's rate token last (the guard only checked the key), so the bucket's row lock is held only while it commits.
SUBMIT = "select response::text, replayed from notify_api.submit_notification_http_v1(%s, %s::jsonb, %s, %s, %s, %s, %s)"
BATCH = "select notify_api.submit_notifications_http_v1(%s, %s::jsonb, %s, %s, %s, %s)::text"
CHARGE = "select notify_api.charge_api_key_v1(%s, %s)"
CALLBACK_CHECK_SECONDS = 5.0  # one batch's callback URLs are resolved concurrently, each within this
T = TypeVar("T")


def _is_test(answer: str | None) -> bool:
    """Whether a submission's answer (jsonb text, which writes `"key": value`) is a test key's, as stored with the request."""
    return answer is not None and '"test": true' in answer


def _refused(exc: BaseException) -> bool:
    """A request the caller got wrong (a problem of ours, or ND4xx from SQL but the rate limit itself)."""
    if isinstance(exc, ProblemException):
        return 400 <= exc.status_code < 500
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, psycopg.Error) and sqlstate.startswith("ND4") and sqlstate != "ND429"


async def _charged_even_if_refused(db: Database, tenant: Tenant, work: Awaitable[T]) -> T:
    """Runs a submission whose statement takes the rate token last; a request refused before that (a 413, a bad
    callback URL, a template or variable error in SQL) takes its token here, so refusals count against the rate too."""
    try:
        return await work
    except Exception as exc:
        if _refused(exc):
            await db.one(CHARGE, (tenant.key_id, tenant.rate))  # ND429 here: the caller is over its rate, say so
        raise


async def _check_callback_urls(state: State, urls: set[str]) -> dict[str, ProblemException]:
    """Each distinct callback URL of a batch resolved once, all at the same time, each within CALLBACK_CHECK_SECONDS."""

    async def one(url: str) -> ProblemException | None:
        try:
            await asyncio.wait_for(check_callback_url(state, url, "callback_url"), CALLBACK_CHECK_SECONDS)
        except ProblemException as exc:
            return exc
        except TimeoutError:
            return ProblemException(422, "unsafe_callback_url", "callback URL's host does not resolve in time", "callback_url")
        return None

    ordered = sorted(urls)
    outcomes = await asyncio.gather(*(one(url) for url in ordered))
    return {url: exc for url, exc in zip(ordered, outcomes, strict=True) if exc is not None}


class Notifications(Controller):
    path = "/notifications"
    tags = ["notifications"]

    @post(
        "/",
        responses=ERRORS,
        operation_id="submitNotification",
        opt={"scope": "submit", "charge": "statement"},
        status_code=202,
        summary="Submit a notification intent",
        description="One delivery per channel (per recipient and channel for a fan-out with `recipients`); suppressed "
        "deliveries say why. A repeated Idempotency-Key with the same body replays the original response with "
        "200 and Idempotent-Replayed: true; with another body, 422. Bodies over DISPATCHER_MAX_BODY_BYTES get "
        "413, except a fan-out, which may reach DISPATCHER_MAX_BULK_BODY_BYTES.",
    )
    async def submit(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[NotificationIn],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        state: State,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", required=False, max_length=255)] = None,
    ) -> Response[NotificationAccepted]:
        return await _charged_even_if_refused(db, tenant, self._submit(request, data, tenant, db, state, idempotency_key))

    async def _submit(
        self,
        request: Request[Any, Any, Any],
        data: NotificationIn,
        tenant: Tenant,
        db: Database,
        state: State,
        idempotency_key: str | None,
    ) -> Response[NotificationAccepted]:
        # The guard verified the key before the body was read; this router's body limit is the bulk one (a fan-out).
        body = await request.body()
        settings: Settings = state.settings
        if data.recipients is None and len(body) > settings.max_body_bytes:
            raise too_large(settings.max_body_bytes, "DISPATCHER_MAX_BODY_BYTES")
        await check_callback_url(state, data.callback_url, "callback_url")
        row = await db.one(
            SUBMIT,
            (
                tenant.id,
                body.decode("utf-8"),
                idempotency_key,
                request_ids.current(),
                tracing.current_traceparent(),
                tenant.key_id,
                tenant.rate,
            ),
        )
        if row is None:
            raise unauthorized()
        metrics.SUBMISSIONS.labels("replayed" if row[1] else "accepted", "true" if _is_test(row[0]) else "false").inc()
        if row[1]:
            return json_response(row[0], 200, {"Idempotent-Replayed": "true"})
        return json_response(row[0], 202)

    @post(
        "/batch",
        responses=ERRORS,
        operation_id="submitNotificationBatch",
        opt={"scope": "submit", "charge": "statement"},
        status_code=200,
        summary="Submit up to 1,000 independent intents",
        description="Each item has its own idempotency key and succeeds or fails alone, a `notification` of the wrong "
        "shape included; the answer reports each item's outcome (accepted, replayed, or its error) in order. "
        "Bodies up to DISPATCHER_MAX_BULK_BODY_BYTES.",
    )
    async def batch(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[BatchIn],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        state: State,
    ) -> Response[BatchOut]:
        # Only the envelope is decoded strictly; each item's shape is checked alone (a bad one fails alone).
        failed: dict[int, dict[str, Any]] = {}
        parsed: dict[int, BatchItem] = {}
        for i, raw in enumerate(data.items):
            try:
                parsed[i] = msgspec.convert(raw, BatchItem)
            except msgspec.ValidationError as exc:
                failed[i] = problems.batch_item_error(str(exc), i)
        refused = await _check_callback_urls(
            state, {it.notification.callback_url for it in parsed.values() if it.notification.callback_url is not None}
        )
        for i, item in parsed.items():
            exc = refused.get(item.notification.callback_url or "")
            if exc is not None:
                failed[i] = {
                    "index": i,
                    "outcome": "error",
                    "status": exc.status_code,
                    "error": {"type": exc.type_, "detail": exc.detail, "field": exc.field},
                }
        kept = [i for i in range(len(data.items)) if i not in failed]
        results: list[dict[str, Any]] = []
        test = False
        if kept:
            items = [data.items[i] for i in kept] if failed else data.items
            body = encode({"items": items}).decode() if failed else (await request.body()).decode("utf-8")
            statement = db.one(
                BATCH, (tenant.id, body, request_ids.current(), tracing.current_traceparent(), tenant.key_id, tenant.rate)
            )
            row = await _charged_even_if_refused(db, tenant, statement)
            if row is None:
                raise unauthorized()
            if not failed:  # every item reached SQL: its answer is the whole answer, indexes and counts included
                return json_response(row[0])
            answer = msgspec.json.decode(row[0])
            test = answer.get("test") is True  # a test key's batch (sql/071_api_http.sql)
            for position, result in zip(kept, answer["items"], strict=True):
                results.append({**result, "index": position})
        else:  # every item failed its shape: the request still takes its token
            await db.one(CHARGE, (tenant.key_id, tenant.rate))
        results.extend(failed.values())
        results.sort(key=lambda r: r["index"])
        out = {
            "items": results,
            **{
                name: sum(1 for r in results if r["outcome"] == outcome)
                for name, outcome in (("accepted", "accepted"), ("replayed", "replayed"), ("failed", "error"))
            },
            **({"test": True} if test else {}),
        }
        return json_response(encode(out).decode())

    @get(
        "/",
        responses=ERRORS,
        operation_id="findNotifications",
        opt={"scope": "read"},
        summary="Find notifications, newest first",
        description="Filters (all optional, combined with and): recipient ref, a delivery's status and channel, category, "
        "template, created_from/created_to (ISO 8601), idempotency_key, metadata_key with metadata_value. Pages by "
        "`cursor` (the previous page's next_cursor); each call reads at most 1,000 candidates, so a page may be short "
        "while next_cursor is set. A bad filter or cursor is 422 naming it.",
    )
    async def find(
        self,
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        recipient: Annotated[str | None, QueryParameter(name="recipient", required=False)] = None,
        status: Annotated[str | None, QueryParameter(name="status", required=False)] = None,
        channel: Annotated[str | None, QueryParameter(name="channel", required=False)] = None,
        category: Annotated[str | None, QueryParameter(name="category", required=False)] = None,
        template: Annotated[str | None, QueryParameter(name="template", required=False)] = None,
        created_from: Annotated[str | None, QueryParameter(name="created_from", required=False)] = None,
        created_to: Annotated[str | None, QueryParameter(name="created_to", required=False)] = None,
        idempotency_key: Annotated[str | None, QueryParameter(name="idempotency_key", required=False)] = None,
        metadata_key: Annotated[str | None, QueryParameter(name="metadata_key", required=False)] = None,
        metadata_value: Annotated[str | None, QueryParameter(name="metadata_value", required=False)] = None,
        cursor: Annotated[str | None, QueryParameter(name="cursor", required=False)] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=200)] = 50,
    ) -> Response[NotificationPage]:
        given = {
            "recipient": recipient,
            "status": status,
            "channel": channel,
            "category": category,
            "template": template,
            "created_from": created_from,
            "created_to": created_to,
            "idempotency_key": idempotency_key,
            "metadata_key": metadata_key,
            "metadata_value": metadata_value,
        }
        filters = encode({k: v for k, v in given.items() if v is not None}).decode()
        return await sql_json(db, "notify_api.find_notifications_v1(%s, %s::jsonb, %s, %s)", tenant.id, filters, cursor, limit)

    @get(
        "/{notification_id:uuid}",
        responses=ERRORS,
        operation_id="getNotification",
        opt={"scope": "read"},
        summary="Read a notification: a summary of its deliveries, and up to 100 of them inline",
        description="A larger fan-out answers `deliveries_omitted: true`; its deliveries are read page by page from "
        "GET /internal/notifications/{id}/deliveries.",
    )
    async def read(
        self, notification_id: FromPath[UUID], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[NotificationOut]:
        return await sql_json(db, "notify_api.get_notification_v2(%s, %s)", tenant.id, notification_id)

    @get(
        "/{notification_id:uuid}/deliveries",
        responses=ERRORS,
        operation_id="listNotificationDeliveries",
        opt={"scope": "read"},
        summary="A notification's deliveries, page by page, with their history",
    )
    async def deliveries(
        self,
        notification_id: FromPath[UUID],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        cursor: Annotated[str | None, QueryParameter(name="cursor", required=False)] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=1000)] = 100,
    ) -> Response[DeliveryPage]:
        return await sql_json(db, "notify_api.list_deliveries_v1(%s, %s, %s, %s)", tenant.id, notification_id, cursor, limit)

    @post(
        "/{notification_id:uuid}/cancel",
        responses=ERRORS,
        operation_id="cancelNotification",
        opt={"scope": "submit"},
        status_code=200,
        summary="Cancel what has not been claimed yet",
        description="Says per delivery whether it was cancelled and, if not, why.",
    )
    async def cancel(
        self, notification_id: FromPath[UUID], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[CancelResult]:
        return await sql_json(db, "notify_api.cancel_notification_v1(%s, %s)", tenant.id, notification_id)

    @get(
        "/{notification_id:uuid}/callbacks",
        responses=ERRORS,
        operation_id="listNotificationCallbacks",
        opt={"scope": "read"},
        summary="The status callbacks of a notification, with every attempt",
        description="One message per delivery status change, in sequence order per delivery; each attempt with the "
        "receiver's status code or the error.",
    )
    async def callbacks(
        self, notification_id: FromPath[UUID], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[list[CallbackMessage]]:
        return await sql_json(db, "notify_api.list_callbacks_v1(%s, %s)", tenant.id, notification_id)
