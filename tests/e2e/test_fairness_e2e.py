"""Priority and tenant fairness through the real processes: tenant A's 5,000-recipient fan-out is being drained by the
worker when tenant B's single notification and A's own high-priority one arrive; both are claimed before most of A's
backlog, instead of behind all of it (the claim serves higher priority first and, within a priority, tenants in turn)."""

from __future__ import annotations

import time

import pytest

from dispatcher import keys
from tests.conftest import REMINDER, Service, call, intent

pytestmark = pytest.mark.slow

BACKLOG = 5000


def sent_before(db, tenant_id: str, delivery_id: str) -> int:  # noqa: ANN001
    """How many of tenant A's backlog deliveries were claimed (went to sending) before this one was."""
    return db.execute(
        """select count(*) from notify.delivery_events e
            where e.tenant_id = %s and e.to_status = 'sending' and e.delivery_id <> %s
              and e.occurred_at < (select min(x.occurred_at) from notify.delivery_events x
                                    where x.delivery_id = %s and x.to_status = 'sending')""",
        (tenant_id, delivery_id, delivery_id),
    ).fetchone()[0]


def wait_delivered(service: Service, key: str | None, notification_id: str) -> dict:
    with service.client(key) as c:
        for _ in range(300):
            got = c.get(f"/internal/notifications/{notification_id}").json()["deliveries"][0]
            if got["status"] == "delivered":
                return got
            time.sleep(0.1)
    raise AssertionError(f"not delivered: {got}")


def test_a_bulk_backlog_holds_back_neither_another_tenant_nor_a_high_priority_message(service: Service, db) -> None:  # noqa: ANN001
    other = str(call(db, "notify_api.create_tenant_v1('other-club')")["id"])
    other_key = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, 'tests', %s, %s)", other, keys.display_prefix(other_key), keys.digest(other_key))
    with service.client() as a, service.client(other_key) as b:
        for c in (a, b):
            assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        fanout = {
            "recipients": [{"ref": f"m-{i}", "addresses": {"email": f"m{i}@example.com"}} for i in range(BACKLOG)],
            "channels": ["email"],
            "template": "event_reminder",
            "variables": {"name": "Ana", "event": "Long run"},
            "priority": "bulk",
        }
        assert a.post("/internal/notifications", json=fanout).status_code == 202
        theirs = b.post("/internal/notifications", json=intent(channels=["email"])).json()
        urgent = a.post("/internal/notifications", json=intent(channels=["email"], priority="high")).json()
    for body, key in ((theirs, other_key), (urgent, None)):
        delivery = wait_delivered(service, key, body["id"])
        # Behind the whole backlog on a first-come claim; here at most a few claims of A went first.
        before = sent_before(db, service.tenant_id, delivery["id"])
        assert before < BACKLOG / 2, (key is None, before)
