"""POST /internal/notifications/preview over HTTP against a real database: the same body and shape errors as a
submission, the content rendered with the worker's renderer and limits, a render failure as a per-delivery reason
(never a 5xx), and a pathological template timing out in the render pool while the API serves other requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher import keys
from dispatcher.settings import Settings
from tests.conftest import app_url, call, intent

PREVIEW = "/internal/notifications/preview"
# 10^12 loop steps: days of work, nothing printed (so no output cap stops it); only the time budget does.
SLOW = "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}{% endfor %}{% endfor %}{% endfor %}done"


def make_key(db: psycopg.Connection, tenant: str, scopes: str = "{submit,read,admin}", test: bool = False) -> str:
    key = keys.generate()
    call(
        db,
        "notify_api.create_api_key_v1(%s, 'tests', %s, %s, %s, %s)",
        tenant,
        keys.display_prefix(key),
        keys.digest(key),
        scopes,
        test,
    )
    return key


def app_client(db: psycopg.Connection, db_url: str, tenant: str, **settings: Any) -> TestClient:
    config = Settings(database_url=app_url(db_url), max_body_bytes=64 * 1024, **settings)
    client = TestClient(app=create_app(config))
    client.headers["Authorization"] = f"Bearer {make_key(db, tenant)}"
    return client


@pytest.fixture
def client(db: psycopg.Connection, db_url: str, ready: str) -> Iterator[TestClient]:
    with app_client(db, db_url, ready, render_processes=1) as c:
        yield c


def by_channel(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["channel"]: d for d in answer["deliveries"]}


def count_rows(db: psycopg.Connection) -> tuple[int, ...]:
    return db.execute(
        "select (select count(*) from notify.recipients), (select count(*) from notify.recipient_addresses),"
        " (select count(*) from notify.notification_requests), (select count(*) from notify.notification_deliveries),"
        " (select count(*) from public.procrastinate_jobs)"
    ).fetchone()


def test_renders_each_delivery_with_the_workers_renderer_and_writes_nothing(client, db):
    before = count_rows(db)
    response = client.post(PREVIEW, json=intent())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["preview"] is True and answer["outcome"] == "accepted"
    wa, email = by_channel(answer)["whatsapp"], by_channel(answer)["email"]
    assert wa["would_send"] and wa["rendered"] == {
        "template": "event_reminder",
        "language": "en",
        "parameters": ["Ana", "Long run"],
    }
    assert email["rendered"] == {
        "subject": "Reminder: Long run",
        "text": "Hi Ana, see you at Long run.",
        "html": "<p>Hi Ana, see you at <b>Long run</b>.</p>",
    }
    assert count_rows(db) == before


def test_html_is_escaped_as_a_send_escapes_it(client):
    email = by_channel(client.post(PREVIEW, json=intent(variables={"name": "<script>", "event": "x"})).json())["email"]
    assert "&lt;script&gt;" in email["rendered"]["html"] and email["rendered"]["text"].startswith("Hi <script>")


@pytest.mark.parametrize(
    "change",
    [
        {"bogus": 1},
        {"channels": []},
        {"channels": ["pigeon"]},
        {"recipient": {"ref": "r", "addresses": {"whatsapp": "600111222"}}},
        {"expires_at": "2020-01-01T00:00:00Z"},
        {"template": "no_such_template", "recipient": {"ref": "r", "timezone": "Mars/Olympus"}},
    ],
)
def test_a_body_a_submission_refuses_is_refused_alike(client, db, change):
    before = count_rows(db)
    body = intent(**change)
    submitted, previewed = client.post("/internal/notifications", json=body), client.post(PREVIEW, json=body)
    assert submitted.status_code >= 400
    assert previewed.status_code == submitted.status_code
    assert {k: v for k, v in previewed.json().items() if k != "instance"} == {
        k: v for k, v in submitted.json().items() if k != "instance"
    }
    assert count_rows(db) == before


def test_what_a_submission_refuses_for_the_template_is_a_reason_per_delivery(client):
    response = client.post(PREVIEW, json=intent(template="no_such_template"))
    assert response.status_code == 200
    answer = response.json()
    assert answer["outcome"] == "refused" and answer["refused"]["type"] == "template_not_found"
    assert all(d["reasons"][-1]["reason"] == "template_not_found" and "rendered" not in d for d in answer["deliveries"])


def test_a_render_failure_is_a_reason_never_a_5xx(client, db, ready):
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'broken', %s)",
        ready,
        Jsonb({"channels": {"email": {"subject": "s", "text": "{{ name.first.x }}"}}}),
    )
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'huge', %s)",
        ready,
        Jsonb({"channels": {"email": {"subject": "s", "text": "{{ 'x' * 60000 }}{{ 'x' * 60000 }}"}}}),
    )
    for template, error in (("broken", "UndefinedError"), ("huge", "OutputTooLarge")):
        response = client.post(PREVIEW, json=intent(template=template, channels=["email"]))
        assert response.status_code == 200, response.text
        email = response.json()["deliveries"][0]
        assert not email["would_send"] and "rendered" not in email
        assert email["reasons"][-1]["reason"] == "render_failed" and email["reasons"][-1]["detail"].startswith(error), email


def test_a_test_keys_preview_names_the_mock(client, db, ready):
    key = make_key(db, ready, "{submit}", test=True)
    answer = client.post(PREVIEW, json=intent(), headers={"Authorization": f"Bearer {key}"}).json()
    assert answer["test"] is True
    assert {d["provider"]["source"] for d in answer["deliveries"]} == {"test_key"}


def test_preview_needs_the_submit_scope(client, db, ready):
    key = make_key(db, ready, "{read}")
    assert client.post(PREVIEW, json=intent(), headers={"Authorization": f"Bearer {key}"}).status_code == 403
    client.headers.pop("Authorization")
    assert client.post(PREVIEW, json=intent()).status_code == 401


def test_a_single_recipients_body_has_the_submissions_size_limit(client):
    body = intent(variables={"name": "x" * (70 * 1024), "event": "e"})
    assert client.post(PREVIEW, json=body).status_code == client.post("/internal/notifications", json=body).status_code == 413


def test_a_pathological_template_times_out_while_another_request_is_served(db, db_url, ready):
    """A template that would render for minutes is cut off at the render budget and answered as render_failed; while it
    runs in a render process, the API's event loop serves another preview (rendered by the pool's other process)."""
    call(
        db, "notify_api.upsert_template_v1(%s, 'slow', %s)", ready, Jsonb({"channels": {"email": {"subject": "s", "text": SLOW}}})
    )
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'quick', %s)",
        ready,
        Jsonb({"channels": {"email": {"subject": "s", "text": "{{ name|upper }}"}}}),
    )
    with app_client(db, db_url, ready, render_processes=2, render_timeout_ms=5000) as client:
        pool = client.app.state.render_pool
        entered = threading.Event()
        original = pool.render

        async def render(channel: str, items: list[Any]) -> list[Any]:
            if any("range" in str(content) for _, content, _ in items):
                entered.set()
            return await original(channel, items)

        pool.render = render
        slow: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: slow.update(response=client.post(PREVIEW, json=intent(template="slow", channels=["email"])))
        )
        thread.start()
        assert entered.wait(30), "the slow preview never reached the renderer"
        quick = client.post(PREVIEW, json=intent(template="quick", channels=["email"]))
        slow_still_running = thread.is_alive()
        thread.join(120)
        assert quick.status_code == 200 and quick.json()["deliveries"][0]["rendered"]["text"] == "ANA"
        assert slow_still_running, "the quick preview was answered only after the slow one: the event loop was stalled"
        email = slow["response"].json()["deliveries"][0]
        assert slow["response"].status_code == 200 and not email["would_send"]
        assert email["reasons"][-1] == {"reason": "render_failed", "detail": "RenderTimeout: render time budget exceeded"}
