"""notify_api.list_consents_v1: a recipient's consent in force, as submit and claim decide it, and the ledger."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit
from tests.sql.test_record_consent_v1 import consent


def test_the_ledger_is_listed_with_the_state_in_force(db, tenant):
    consent(db, tenant, channel="whatsapp", status="granted", source="form", evidence={"ip": "203.0.113.7"})
    out = call(db, "notify_api.list_consents_v1(%s, 'runner-1')", tenant)
    assert [(c["channel"], c["allowed"], c["policy"]) for c in out["current"]] == [
        ("whatsapp", True, "opt_in"),
        ("email", True, "opt_out"),
        ("sms", False, "opt_in"),
    ]
    assert out["history"][0]["evidence"] == {"ip": "203.0.113.7"} and out["history"][0]["recorded_by"] == "tests"


def test_the_state_in_force_shows_a_category_revoke_as_submit_decides_it(db, ready):
    """A category-level revoke shows as revoked for that category; the channel-wide state stays as it is, and
    both agree with what a submission of that category (and of none) actually gets."""

    def state(ref="runner-42"):
        out = call(db, "notify_api.list_consents_v1(%s, %s)", ready, ref)
        return {c["channel"]: (c["allowed"], {k["category"]: k["allowed"] for k in c["categories"]}) for c in out["current"]}

    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "revoked", "source": "preferences", "category": "marketing"}),
    )
    assert state()["email"] == (True, {"marketing": False})
    assert state()["whatsapp"] == (True, {})  # the ready fixture's channel-wide grant, no category named
    marketing = submit(db, ready, intent(channels=["email"], category="marketing"), key="k-marketing")[0]
    reminders = submit(db, ready, intent(channels=["email"], category="reminders"), key="k-reminders")[0]
    assert [(d["status"], d.get("reason")) for d in marketing["deliveries"]] == [("suppressed", "no_consent")]
    assert [d["status"] for d in reminders["deliveries"]] == ["queued"]
    # a later channel-wide grant re-allows every category, as the check decides it (the latest applicable entry)
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "granted", "source": "form"}),
    )
    assert state()["email"] == (True, {"marketing": True})
    assert [
        d["status"] for d in submit(db, ready, intent(channels=["email"], category="marketing"), key="k-2")[0]["deliveries"]
    ] == ["queued"]
    # and a channel-wide revoke stops the channel and every category named
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "revoked", "source": "complaint"}),
    )
    assert state()["email"] == (False, {"marketing": False})
