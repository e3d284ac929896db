"""notify_api.resolve_delivery_v1 and the deadline for unknown outcomes (set_unknown_deadline_v1, applied by
run_maintenance_v1): an unknown ends, by an operator's hand or by its channel's deadline, never by a resend."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, submit


def unknown(db, tenant, channel="whatsapp"):
    """A delivery whose send crashed after the request left us: its lease expired, maintenance made it unknown."""
    submit(db, tenant, intent(channels=[channel]))
    row = claim(db, channel, lease=1)[0]
    db.execute("update notify.notification_deliveries set lease_expires_at = now() - interval '1 s' where id = %s", (row[1],))
    call(db, "notify_api.run_maintenance_v1()")
    assert status(db, row[1]) == "unknown"
    return row[1]


def status(db, delivery_id):
    return db.execute("select status::text from notify.notification_deliveries where id = %s", (delivery_id,)).fetchone()[0]


def resolve(db, tenant, delivery_id, body, by="api_key:k"):
    return call(db, "notify_api.resolve_delivery_v1(%s, %s, %s, %s)", tenant, delivery_id, Jsonb(body), by)


def test_an_operator_resolves_an_unknown_with_a_note_in_the_history(db, ready):
    d = unknown(db, ready)
    out = resolve(db, ready, d, {"status": "sent", "note": "Meta console shows it sent"})
    assert out["status"] == "sent" and out["sent_at"]
    last = out["events"][-1]
    assert (last["from"], last["to"], last["source"]) == ("unknown", "sent", "operator:api_key:k")
    assert last["reason"] == "resolved: Meta console shows it sent"


def test_resolving_to_failed_and_the_refusals(db, ready):
    d = unknown(db, ready)
    with pytest.raises(psycopg.Error) as err:
        resolve(db, ready, d, {"status": "delivered", "note": "x"})
    assert err.value.sqlstate == "ND400" and err.value.diag.column_name == "status"
    with pytest.raises(psycopg.Error) as err:
        resolve(db, ready, d, {"status": "failed"})
    assert err.value.sqlstate == "ND400" and err.value.diag.column_name == "note"
    assert resolve(db, ready, d, {"status": "failed", "note": "provider says rejected"})["status"] == "failed"
    with pytest.raises(psycopg.Error) as err:  # no longer unknown
        resolve(db, ready, d, {"status": "sent", "note": "again"})
    assert err.value.sqlstate == "ND409" and err.value.diag.constraint_name == "not_unknown"
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    d3 = unknown(db, ready)
    with pytest.raises(psycopg.Error) as err:
        resolve(db, other, d3, {"status": "sent", "note": "x"})
    assert err.value.sqlstate == "ND404"
    assert status(db, d3) == "unknown"


def test_an_unknown_past_its_deadline_becomes_failed_and_is_never_resent(db, ready):
    d = unknown(db, ready)
    assert call(db, "notify_api.run_maintenance_v1()")["unknown_finalized"] == 0  # within the default 7 days
    db.execute("update notify.notification_deliveries set updated_at = now() - interval '6 days' where id = %s", (d,))
    assert call(db, "notify_api.run_maintenance_v1()")["unknown_finalized"] == 0
    assert call(db, "notify_api.set_unknown_deadline_v1(%s, 'whatsapp', 86400)", ready) == {
        "channel": "whatsapp",
        "after_seconds": 86400,
        "default": False,
    }
    out = call(db, "notify_api.run_maintenance_v1()")
    assert out["unknown_finalized"] == 1 and out["requeued"] == 0
    row = db.execute(
        "select status::text, reason, attempt, (select count(*) from notify.delivery_attempts a where a.delivery_id = d.id)"
        " from notify.notification_deliveries d where id = %s",
        (d,),
    ).fetchone()
    assert row == ("failed", "outcome_unknown_deadline", 1, 1)  # one attempt: not resent
    assert claim(db, "whatsapp") == []
    source = db.execute(
        "select source from notify.delivery_events where delivery_id = %s order by seq desc limit 1", (d,)
    ).fetchone()[0]
    assert source == "maintenance"
    # back to the default
    assert call(db, "notify_api.set_unknown_deadline_v1(%s, 'whatsapp', null)", ready)["default"] is True
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.set_unknown_deadline_v1(%s, 'whatsapp', 5)", ready)
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == "after_seconds"


def test_another_tenants_deadline_does_not_apply(db, ready):
    d = unknown(db, ready)
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    call(db, "notify_api.set_unknown_deadline_v1(%s, 'whatsapp', 60)", other)
    db.execute("update notify.notification_deliveries set updated_at = now() - interval '1 hour' where id = %s", (d,))
    assert call(db, "notify_api.run_maintenance_v1()")["unknown_finalized"] == 0 and status(db, d) == "unknown"
