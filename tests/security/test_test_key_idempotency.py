"""Attack surface: idempotency keys shared between a tenant's test and live submissions (README "Test keys").

A test key's holder (a developer, a CI job, or whoever stole a key that can only reach the mock) reuses the
Idempotency-Key of a live request, or uses a key first that the live service will use next. With one key space the
test submission replays the live answer (it learns the live request's id and deliveries), or, worse, the live
submission after it replays the TEST request: a live notification that is never sent. Test and live are two scopes:
each request below is made as the API makes it (notify_api.submit_notification_http_v1 / submit_notifications_http_v1
with the key's id, as the application role), or as a trusted SQL caller (always live)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from cli import commands as cli
from tests.conftest import app_url, call, intent
from tests.sql.test_set_channel_provider_v1 import WA, set_provider

ROUTES = ("single", "fanout", "batch_usual", "batch_item", "sql")


def body_for(route: str, ref: str = "runner-42") -> dict[str, Any]:
    if route == "fanout":
        body = intent()
        del body["recipient"]
        return {**body, "recipients": [{"ref": ref, "addresses": {"whatsapp": "+34600111222"}}, {"ref": ref + "-b"}]}
    if route == "batch_item":  # not a usual body (a metadata-free expiry): the batch's item-by-item path
        return intent(expires_at="2999-01-01T00:00:00Z")
    return intent()


def submit(conn: psycopg.Connection, tenant: str, key_id: str | None, route: str, body: dict, idem: str) -> tuple[dict, bool]:
    """One submission by the given route, as that route's caller makes it; (answer, replayed)."""
    if route == "sql":
        assert key_id is None  # a trusted SQL caller has no key: it is live
        return conn.execute(
            "select response, replayed from notify_api.submit_notification_v1(%s, %s, %s)", (tenant, Jsonb(body), idem)
        ).fetchone()
    if route.startswith("batch"):
        answer = call(
            conn,
            "notify_api.submit_notifications_http_v1(%s, %s, null, null, %s, 1000)",
            tenant,
            Jsonb({"items": [{"idempotency_key": idem, "notification": body}]}),
            key_id,
        )
        item = answer["items"][0]
        assert item["outcome"] in ("accepted", "replayed"), item
        return item["body"], item["outcome"] == "replayed"
    return conn.execute(
        "select response, replayed from notify_api.submit_notification_http_v1(%s, %s, %s, null, null, %s, 1000)",
        (tenant, Jsonb(body), idem, key_id),
    ).fetchone()


@pytest.fixture
def keys(db: psycopg.Connection, ready: str) -> dict[str, str]:
    _, live = cli.create_key(db, ready, "live")
    _, test = cli.create_key(db, ready, "ci", test=True)
    set_provider(db, ready, "whatsapp", WA)  # the tenant's WhatsApp goes to a real provider
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42-b', %s)",
        ready,
        Jsonb({"channel": "whatsapp", "status": "granted", "source": "t"}),
    )
    return {"live": live["id"], "test": test["id"]}


@pytest.fixture
def app(db: psycopg.Connection, db_url: str) -> psycopg.Connection:
    with psycopg.connect(app_url(db_url), autocommit=True) as conn:
        yield conn


def deliveries_of(db: psycopg.Connection, request_id: str) -> list[dict]:
    return (
        db.cursor(row_factory=dict_row)
        .execute(
            "select r.test as request_test, d.test, d.status from notify.notification_requests r"
            " join notify.notification_deliveries d on d.tenant_id = r.tenant_id and d.request_id = r.id where r.id = %s",
            (request_id,),
        )
        .fetchall()
    )


def claimed(db: psycopg.Connection) -> dict[str, str]:
    """What the worker's claim hands out for WhatsApp: request id -> provider."""
    rows = db.cursor(row_factory=dict_row).execute("select * from notify_api.claim_deliveries_v1('whatsapp', 100, 60)").fetchall()
    return {str(r["request_id"]): r["provider"] for r in rows}


@pytest.mark.parametrize("route", [r for r in ROUTES if r != "sql"])
def test_a_test_key_reusing_a_live_requests_key_gets_a_new_test_request_not_the_live_answer(db, ready, keys, app, route):
    live, replayed = submit(app, ready, keys["live"], route, body_for(route), "order-1")
    assert not replayed and "test" not in live
    # the same body: no replay of the live answer (its id, its deliveries)
    same, replayed = submit(app, ready, keys["test"], route, body_for(route), "order-1")
    assert not replayed and same["id"] != live["id"] and same["test"] is True
    # another body: not refused as a reuse of the live request's key either
    other, replayed = submit(app, ready, keys["test"], route, body_for(route, "runner-7"), "order-2")
    assert not replayed and other["test"] is True
    _, replayed = submit(app, ready, keys["live"], route, body_for(route), "order-2")  # and order-2 is still free for live
    assert not replayed
    assert all(d["test"] and d["request_test"] for d in deliveries_of(db, same["id"]))
    # within its own scope a key still replays
    again, replayed = submit(app, ready, keys["test"], route, body_for(route), "order-1")
    assert replayed and again == same
    again, replayed = submit(app, ready, keys["live"], route, body_for(route), "order-1")
    assert replayed and again == live


@pytest.mark.parametrize("route", ROUTES)
def test_a_live_submission_after_a_test_one_with_the_same_key_is_queued_for_the_real_provider(db, ready, keys, app, route):
    test, replayed = submit(app, ready, keys["test"], "single" if route == "sql" else route, body_for(route), "signup-9")
    assert not replayed and test["test"] is True
    live, replayed = submit(
        db if route == "sql" else app, ready, None if route == "sql" else keys["live"], route, body_for(route), "signup-9"
    )
    assert not replayed, "the live notification was answered with the test request: it would never be sent"
    assert live["id"] != test["id"] and "test" not in live
    rows = deliveries_of(db, live["id"])
    assert rows and not any(d["test"] or d["request_test"] for d in rows)
    assert {d["status"] for d in rows} & {"queued"}
    providers = claimed(db)
    assert providers[live["id"]] == "whatsapp_cloud"  # the real provider
    assert providers[test["id"]] == "mock"
