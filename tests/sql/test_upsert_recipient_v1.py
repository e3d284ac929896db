"""notify_api.upsert_recipient_v1: PUT semantics for a recipient."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call


def test_upsert_recipient_sets_and_removes_addresses(db, tenant):
    r = call(
        db,
        "notify_api.upsert_recipient_v1(%s, 'runner-1', %s)",
        tenant,
        Jsonb(
            {"addresses": {"whatsapp": "+34600111222", "email": "a@example.com"}, "locale": "es-ES", "timezone": "Europe/Madrid"}
        ),
    )
    assert r["addresses"] == {"whatsapp": "+34600111222", "email": "a@example.com"} and r["locale"] == "es-ES"
    r = call(db, "notify_api.upsert_recipient_v1(%s, 'runner-1', %s)", tenant, Jsonb({"addresses": {"email": None}}))
    assert r["addresses"] == {"whatsapp": "+34600111222"} and r["timezone"] == "Europe/Madrid"


def test_the_address_check_is_also_a_table_constraint(db, tenant):
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-1', '{}')", tenant)
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "insert into notify.recipient_addresses (tenant_id, recipient_id, channel, address) "
            "select tenant_id, id, 'sms', '12345' from notify.recipients"
        )
