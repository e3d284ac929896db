"""/internal/quiet-hours and /internal/frequency-caps over HTTP against a real database: read, set, delete, errors
naming the field, scopes."""

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


def test_quiet_hours_get_set_get_delete(client, db, ready):
    got = client.get("/internal/quiet-hours")
    assert got.status_code == 200, got.text
    assert got.json()["default"] is True and got.json()["defaults"]["timezone"] == "UTC"
    body = {"timezone": "Europe/Madrid", "start": "21:00", "end": "08:00", "categories": {"password_reset": {"exempt": True}}}
    put = client.put("/internal/quiet-hours", json=body)
    assert put.status_code == 200, put.text
    assert {k: put.json()[k] for k in body} == body
    assert client.get("/internal/quiet-hours").json() == put.json()
    assert call(db, "notify_api.get_quiet_hours_v1(%s)", ready)["start"] == "21:00"
    gone = client.delete("/internal/quiet-hours")
    assert gone.status_code == 200, gone.text
    assert gone.json()["default"] is True and client.get("/internal/quiet-hours").json()["start"] is None


def test_frequency_caps_get_set_get_delete(client, db, ready):
    assert client.get("/internal/frequency-caps").json()["caps"] == []
    put = client.put("/internal/frequency-caps", json={"caps": [{"max": 3, "period": "P1D", "category": "reminder"}]})
    assert put.status_code == 200, put.text
    assert put.json()["caps"] == [{"max": 3, "period": "P1D", "channel": None, "category": "reminder", "action": "suppress"}]
    assert client.get("/internal/frequency-caps").json() == put.json()
    assert client.delete("/internal/frequency-caps").json()["default"] is True
    assert call(db, "notify_api.get_frequency_caps_v1(%s)", ready)["caps"] == []


def test_bad_settings_are_problems_naming_the_field(client):
    is_problem(client.put("/internal/quiet-hours", json={"start": "21:00", "end": "21:00"}), 422, "end")
    is_problem(client.put("/internal/quiet-hours", json={"start": "21:00"}), 400, "end")
    is_problem(client.put("/internal/quiet-hours", json={"timezone": "Mars/Olympus"}), 400, "timezone")
    is_problem(client.put("/internal/quiet-hours", json={"start": "25:00", "end": "08:00"}), 400, "start")
    is_problem(
        client.put("/internal/quiet-hours", json={"categories": {"reminder": {"start": "21:00"}}}), 400, "categories.reminder.end"
    )
    is_problem(client.put("/internal/frequency-caps", json={"caps": [{"max": 1, "period": "P40D"}]}), 422, "caps[0].period")
    is_problem(client.put("/internal/frequency-caps", json={"caps": [{"max": 1, "period": "1 day"}]}), 400, "caps[0].period")
    # a period too long for an interval: 422 naming it, not a 500
    is_problem(
        client.put("/internal/frequency-caps", json={"caps": [{"max": 1, "period": "P99999999999999D"}]}), 422, "caps[0].period"
    )
    is_problem(client.put("/internal/frequency-caps", json={"caps": [{"max": 0, "period": "P1D"}]}), 400)
    is_problem(client.put("/internal/frequency-caps", json={"limit": 3}), 400)
    assert client.get("/internal/quiet-hours").json()["default"] is True
    assert client.get("/internal/frequency-caps").json()["default"] is True


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
    assert client.get("/internal/quiet-hours", headers=headers).status_code == 200
    assert client.get("/internal/frequency-caps", headers=headers).status_code == 200
    is_problem(client.put("/internal/quiet-hours", json={"start": "21:00", "end": "08:00"}, headers=headers), 403)
    is_problem(client.delete("/internal/quiet-hours", headers=headers), 403)
    is_problem(client.put("/internal/frequency-caps", json={"caps": []}, headers=headers), 403)
    is_problem(client.delete("/internal/frequency-caps", headers=headers), 403)
