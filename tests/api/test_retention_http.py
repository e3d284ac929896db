"""/internal/retention over HTTP against a real database: read, set per channel, errors naming the field, scopes."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from litestar.testing import TestClient

from api.app import create_app
from dispatcher import keys
from dispatcher.settings import Settings
from tests.api.test_api import SECRET, is_problem, make_key
from tests.conftest import app_url, call


@pytest.fixture
def client(db: psycopg.Connection, db_url: str, ready: str) -> Iterator[TestClient]:
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET, max_body_bytes=64 * 1024)
    key, _ = make_key(db, ready)
    with TestClient(app=create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


def test_get_then_set_then_get(client, db, ready):
    got = client.get("/internal/retention")
    assert got.status_code == 200, got.text
    assert (got.json()["content_days"], got.json()["history_days"], got.json()["default"]) == (30, 90, True)
    put = client.put(
        "/internal/retention", json={"content_days": 7, "history_days": 365, "channels": {"email": {"content_days": 14}}}
    )
    assert put.status_code == 200, put.text
    assert put.json()["channels"]["email"] == {"content_days": 14, "history_days": 365, "override": True}
    assert put.json()["channels"]["whatsapp"] == {"content_days": 7, "history_days": 365, "override": False}
    assert client.get("/internal/retention").json() == put.json()
    assert call(db, "notify_api.get_retention_v1(%s)", ready)["content_days"] == 7


def test_bad_settings_are_problems_naming_the_field(client):
    is_problem(client.put("/internal/retention", json={"content_days": 0}), 422, "content_days")
    is_problem(client.put("/internal/retention", json={"content_days": 10, "history_days": 5}), 422, "history_days")
    is_problem(
        client.put("/internal/retention", json={"channels": {"sms": {"history_days": 4000}}}), 422, "channels.sms.history_days"
    )
    is_problem(client.put("/internal/retention", json={"forever": True}), 400)
    assert client.get("/internal/retention").json()["default"] is True


def test_a_read_key_may_look_but_not_change(client, db, ready):
    reader = keys.generate()
    call(
        db,
        "notify_api.create_api_key_v1(%s, 'reader', %s, %s, %s)",
        ready,
        keys.display_prefix(reader),
        keys.digest(reader),
        ["read"],
    )
    headers = {"Authorization": f"Bearer {reader}"}
    assert client.get("/internal/retention", headers=headers).status_code == 200
    is_problem(client.put("/internal/retention", json={"content_days": 1}, headers=headers), 403)
    assert client.get("/internal/retention").json()["default"] is True
