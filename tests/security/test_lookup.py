"""Attacks on finding notifications: another tenant's key, with everything it could know or guess of tenant A (its
recipient refs, idempotency keys, notification ids, a cursor taken from A's pages), finds and reads nothing of A's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from api.app import create_app
from dispatcher.settings import Settings
from tests.api.test_api import SECRET, make_key
from tests.conftest import app_url, call, intent


@pytest.fixture
def two(db, db_url, ready) -> Iterator[tuple[TestClient, TestClient]]:
    other = str(call(db, "notify_api.create_tenant_v1('mallory', 'Mallory', 'en')")["id"])
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET)
    key_a, _ = make_key(db, ready)
    key_b, _ = make_key(db, other)
    with TestClient(app=create_app(settings)) as a, TestClient(app=create_app(settings)) as b:
        a.headers["Authorization"] = f"Bearer {key_a}"
        b.headers["Authorization"] = f"Bearer {key_b}"
        yield a, b


def test_another_tenants_key_finds_nothing_of_a(two):
    a, b = two
    ids = []
    for i in range(3):
        r = a.post("/internal/notifications", json=intent(metadata={"case": "x"}), headers={"Idempotency-Key": f"secret-{i}"})
        ids.append(r.json()["id"])
    own = a.get("/internal/notifications", params={"recipient": "runner-42", "limit": 1}).json()
    assert len(own["items"]) == 1 and own["next_cursor"]  # A finds its own
    for params in (
        {},
        {"recipient": "runner-42"},
        {"idempotency_key": "secret-1"},
        {"metadata_key": "case", "metadata_value": "x"},
        {"template": "event_reminder"},
        {"cursor": own["next_cursor"]},  # A's cursor: a position, not a grant
        {"recipient": "runner-42", "cursor": own["next_cursor"]},
    ):
        found = b.get("/internal/notifications", params=params)
        assert found.status_code == 200 and found.json() == {"items": [], "next_cursor": None}, (params, found.text)
    for path in (f"/internal/notifications/{ids[0]}", f"/internal/notifications/{ids[0]}/deliveries"):
        assert b.get(path).status_code == 404, path
        assert a.get(path).status_code == 200, path
