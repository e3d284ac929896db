"""Shared by the callback functions' tests: callbacks set up for a tenant, and the worker's own statements."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from providers.standard_webhooks import new_secret
from runner.callbacks import CLAIM, RECORD
from tests.conftest import call

URL = "https://hooks.runflow.example/notify"


def configure(db: psycopg.Connection, tenant: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return call(
        db, "notify_api.set_callbacks_v1(%s, %s, %s)", tenant, Jsonb({"url": URL} if body is None else body), new_secret()
    )


def claim_callbacks(db: psycopg.Connection, limit: int = 10, lease: int = 60) -> list[tuple]:
    return db.execute(CLAIM, {"limit": limit, "lease": lease}).fetchall()


def record_callbacks(db: psycopg.Connection, *results: dict[str, Any]) -> int:
    return db.execute(RECORD, {"results": Jsonb(list(results))}).fetchone()[0]


def attempt(tenant: str, message_id: object, number: int, outcome: str, code: int | None = 503) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "id": str(message_id),
        "attempt": number,
        "started_at": "2026-01-01T00:00:00Z",
        "status_code": code,
        "outcome": outcome,
    }
