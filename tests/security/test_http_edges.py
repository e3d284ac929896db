"""Attacks on the HTTP surface: an anonymous caller's bodies, body limits, a batch's bad item, /metrics on the public
listener, callback URLs whose IPv6 address embeds a private IPv4 one."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher import keys
from dispatcher.callback_urls import UnsafeUrl, resolve
from dispatcher.settings import Settings
from tests.conftest import app_url, call, free_port, intent

MAX, BULK = 64 * 1024, 1024 * 1024


def make_key(db: psycopg.Connection, tenant: str) -> str:
    key = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, 'tests', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    return key


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=app_url(db_url), max_body_bytes=MAX, max_bulk_body_bytes=BULK)


@pytest.fixture
def anonymous(settings: Settings) -> Iterator[TestClient]:
    with TestClient(app=create_app(settings)) as c:
        yield c


@pytest.fixture
def client(db: psycopg.Connection, ready: str, settings: Settings) -> Iterator[TestClient]:
    with TestClient(app=create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {make_key(db, ready)}"
        yield c


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    return str(response.json()["type"]).rsplit(":", 1)[1]


ROUTES = [
    ("POST", "/internal/notifications"),
    ("POST", "/internal/notifications/batch"),
    ("PUT", "/internal/recipients/r1"),
    ("POST", "/internal/recipients/r1/consents"),
    ("PUT", "/internal/templates/t"),
    ("PUT", "/internal/callbacks"),
    ("PUT", "/internal/channels/email/provider"),
    ("PUT", "/internal/channels/email/policy"),
]
BODIES = {
    "unknown_field": json.dumps({"colour": "red", **intent()}).encode(),
    "garbage": b"{" * 50_000 + b"\xff\xfe",
    "oversize": b'{"x":"' + b"a" * (2 * BULK) + b'"}',
}


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("authorization", [None, "Bearer nd_00000000_not-a-real-key-at-all-xxxxxxxx"])
def test_an_anonymous_caller_gets_401_before_any_parsing(anonymous, db, method, path, body, authorization):
    headers = {"content-type": "application/json", **({"Authorization": authorization} if authorization else {})}
    response = anonymous.request(method, path, content=BODIES[body], headers=headers)
    assert response.status_code == 401, response.text
    assert problem_type(response) == "unauthorized" and response.headers["www-authenticate"] == "Bearer"
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0


def test_a_single_intent_over_the_ordinary_limit_is_413_and_a_fanout_may_reach_the_bulk_one(client, db):
    big = intent(metadata={"blob": "x" * (MAX + 1)})  # under the bulk limit, over the ordinary one
    response = client.post("/internal/notifications", json=big)
    assert response.status_code == 413 and problem_type(response) == "payload_too_large", response.text
    recipients = [
        {"ref": f"m{i}", "addresses": {"email": f"member-{i:04d}@example.com"}, "variables": {"name": f"Member {i}"}}
        for i in range(1500)
    ]
    fanout = {"recipients": recipients, "channels": ["email"], "template": "event_reminder", "variables": {"event": "Long run"}}
    assert MAX < len(json.dumps(fanout)) < BULK
    assert client.post("/internal/notifications", json=fanout).status_code == 202
    over_bulk = dict(fanout, metadata={"blob": "x" * BULK})
    response = client.post("/internal/notifications", json=over_bulk)
    assert response.status_code == 413 and problem_type(response) == "payload_too_large"
    batch = {"items": [{"notification": intent(metadata={"blob": "x" * (BULK // 4)})} for _ in range(5)]}
    response = client.post("/internal/notifications/batch", json=batch)
    assert response.status_code == 413 and problem_type(response) == "payload_too_large"
    # Other routes keep the ordinary limit.
    response = client.put("/internal/recipients/r1", json={"locale": "x" * (MAX + 1)})
    assert response.status_code == 413 and problem_type(response) == "payload_too_large"
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 1


WRONG_SHAPES = [
    ({"channels": "email", "template": "event_reminder", "recipient": {"ref": "x"}}, "channels"),
    ({**intent(channels=["email"]), "colour": "red"}, "colour"),
    ({**intent(channels=["email"]), "recipient": "runner-42"}, "recipient"),
    ({**intent(channels=["email"]), "variables": ["a"]}, "variables"),
    ("nope", "notification"),
]


def _items() -> list[dict[str, Any]]:
    good = [
        {
            "idempotency_key": f"good-{i}",
            "notification": intent(channels=["email"], recipient={"ref": f"r-{i}", "addresses": {"email": f"r{i}@example.com"}}),
        }
        for i in range(3)
    ]
    bad = [{"idempotency_key": f"bad-{i}", "notification": shape} for i, (shape, _) in enumerate(WRONG_SHAPES)]
    return [good[0], *bad[:2], good[1], *bad[2:], good[2]]


def _check_batch(out: dict[str, Any]) -> None:
    outcomes = [(i["index"], i["outcome"]) for i in out["items"]]
    assert outcomes == [
        (0, "accepted"),
        (1, "error"),
        (2, "error"),
        (3, "accepted"),
        (4, "error"),
        (5, "error"),
        (6, "error"),
        (7, "accepted"),
    ], out
    fields = [i["error"]["field"] for i in out["items"] if i["outcome"] == "error"]
    assert [f.split(".")[0] for f in fields] == [f for _, f in WRONG_SHAPES], fields
    assert all(i["status"] == 400 for i in out["items"] if i["outcome"] == "error")
    assert (out["accepted"], out["replayed"], out["failed"]) == (3, 0, 5)


def test_a_batch_item_of_the_wrong_shape_fails_alone_over_http(client, db):
    response = client.post("/internal/notifications/batch", json={"items": _items()})
    assert response.status_code == 200, response.text
    _check_batch(response.json())
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 3
    again = client.post("/internal/notifications/batch", json={"items": _items()}).json()
    assert [i["outcome"] for i in again["items"]].count("replayed") == 3


def test_a_batch_item_of_the_wrong_shape_fails_alone_over_sql(db, ready):
    out = call(db, "notify_api.submit_notifications_v1(%s, %s)", ready, Jsonb(_items()))
    _check_batch(out)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 3


def test_metrics_are_not_on_the_public_listener(db, ready, db_url):
    port = free_port()
    settings = Settings(database_url=app_url(db_url), metrics_port=port)
    with TestClient(app=create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {make_key(db, ready)}"
        assert c.post("/internal/notifications", json=intent()).status_code == 202
        public = c.get("/metrics")
        assert public.status_code == 404 and "dispatcher_queue" not in public.text and "acme" not in public.text
        operator = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert operator.status_code == 200
        assert 'dispatcher_queue_due{channel="email",tenant="acme"}' in operator.text
        assert 'dispatcher_submissions_total{outcome="accepted",test="false"}' in operator.text
    with pytest.raises(httpx.ConnectError):  # the listener stops with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


EMBEDDED = [
    "https://[64:ff9b::7f00:1]/hook",
    "https://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "https://[64:ff9b::a00:1]/hook",
    "https://[64:ff9b:1:7f00:1::]/hook",
    "https://[2002:7f00:1::]/hook",
    "https://[2002:a9fe:a9fe::1]/hook",
    "https://[::127.0.0.1]/hook",
    "https://[::10.0.0.1]/hook",
    "https://[::ffff:169.254.169.254]/hook",
    "https://[::ffff:7f00:1]/hook",
    "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook",
    "https://[2001:0:7f00:1:0:0:f7ff:fffe]/hook",
]


@pytest.mark.parametrize("url", EMBEDDED)
def test_callback_urls_embedding_a_private_ipv4_are_refused_over_http(client, url):
    response = client.put("/internal/callbacks", json={"url": url})
    assert response.status_code == 422 and response.json()["field"] == "url", response.text
    refused = client.post("/internal/notifications", json=intent(callback_url=url))
    assert refused.status_code == 422, refused.text


@pytest.mark.parametrize("url", EMBEDDED)
def test_callback_urls_embedding_a_private_ipv4_stored_over_sql_are_refused_by_the_worker(db, ready, url):
    """A trusted SQL caller may store any syntactically valid URL (no DNS in SQL); the worker's check at send time,
    the one that guards that path, refuses it and posts nothing."""
    from providers.standard_webhooks import new_secret
    from runner.callbacks import CallbackSender

    call(db, "notify_api.set_callbacks_v1(%s, %s, %s)", ready, Jsonb({"url": None}), new_secret())
    response = db.execute(
        "select response from notify_api.submit_notification_v1(%s, %s, null)",
        (ready, Jsonb(intent(channels=["email"], callback_url=url))),
    ).fetchone()[0]
    assert response["status"] == "accepted"
    with pytest.raises(UnsafeUrl):
        asyncio.run(resolve(url, allow_private=False))
    row = {
        "tenant_id": uuid.UUID(ready),
        "id": uuid.uuid4(),
        "attempt": 1,
        "url": url,
        "secrets": [new_secret()],
        "payload": {"type": "delivery.status_changed", "data": {"delivery_id": "d", "sequence": 1}},
    }

    async def post() -> dict[str, Any]:
        sender = CallbackSender(None, Settings(database_url=""))
        try:
            return await sender.post(row)
        finally:
            await sender.aclose()

    assert asyncio.run(post())["outcome"] == "refused"


def test_public_embedded_addresses_still_pass() -> None:
    for url in ("https://[64:ff9b::808:808]/hook", "https://[2002:808:808::1]/hook", "https://[::ffff:8.8.8.8]/hook"):
        target = asyncio.run(resolve(url, allow_private=False))
        assert target.host_header == url.split("/")[2]


MALFORMED = ["https://[::1/hook", "https://ex\uff03ample.com/hook"]  # an unclosed bracket; a full-width '#'


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_callback_url_is_a_422_not_a_500(client, url):
    """The database's shape check accepts them (no URL parser in SQL); urlsplit raises ValueError on them."""
    response = client.put("/internal/callbacks", json={"url": url})
    assert response.status_code == 422 and response.json()["field"] == "url", response.text
    answer = client.post(
        "/internal/notifications/batch",
        json={
            "items": [
                {"idempotency_key": "b1", "notification": intent(channels=["email"], callback_url=url)},
                {"idempotency_key": "b2", "notification": intent(channels=["email"])},
            ]
        },
    )
    assert answer.status_code == 200, answer.text  # one bad item fails alone, the batch is not a 500
    outcomes = [item["outcome"] for item in answer.json()["items"]]
    assert outcomes[0] == "error" and answer.json()["items"][0]["error"]["type"].endswith("unsafe_callback_url")


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_callback_url_stored_over_sql_is_refused_by_the_worker_not_raised(db, ready, url):
    """A raise out of one post would fail the whole claimed batch (every tenant's callbacks), again at every lease."""
    from providers.standard_webhooks import new_secret
    from runner.callbacks import CallbackSender

    row = {
        "tenant_id": uuid.UUID(ready),
        "id": uuid.uuid4(),
        "attempt": 1,
        "url": url,
        "secrets": [new_secret()],
        "payload": {"type": "delivery.status_changed", "data": {"delivery_id": "d", "sequence": 1}},
    }

    async def post() -> dict[str, Any]:
        sender = CallbackSender(None, Settings(database_url=""))
        try:
            return await sender.post(row)
        finally:
            await sender.aclose()

    assert asyncio.run(post())["outcome"] == "refused"


def test_refused_submissions_use_up_the_rate_limit_too(client, db, ready):
    """A caller sending only requests we refuse (an unknown template: ND422 inside the statement, whose rate token
    is taken last and rolled back with it) must still meet its rate limit."""
    call(db, "notify_api.set_api_rate_v1(%s, 2)", ready)
    answers = [client.post("/internal/notifications", json=intent(template="no_such_template")) for _ in range(6)]
    assert [a.status_code for a in answers].count(429) >= 1, [a.status_code for a in answers]
    assert all(a.status_code in (422, 429) for a in answers)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0
