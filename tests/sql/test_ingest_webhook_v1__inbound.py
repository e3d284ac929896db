"""notify_api.ingest_webhook_v1, inbound messages: opt-out keywords revoke consent, other messages change none."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit
from tests.sql.test_set_channel_provider_v1 import INGEST, WA, set_provider


def test_an_opt_out_keyword_revokes_whatsapp_consent_with_the_message_as_evidence(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", ready, Jsonb({"addresses": {"whatsapp": "+34600111222"}}))
    out = db.execute(
        INGEST,
        (
            "in-2",
            Jsonb(
                [
                    {
                        "phone_number_id": "106540352242922",
                        "sender": "34600111222",
                        "message_id": "wamid.stop",
                        "text": " baja ",
                        "received_at": "2026-11-26T10:00:00Z",
                    }
                ]
            ),
        ),
    ).fetchone()[0]
    assert out["outcomes"] == [{"inbound": "wamid.stop", "outcome": "opted_out"}]
    entry = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", ready)["history"][-1]
    assert (entry["status"], entry["source"], entry["evidence"]["text"], entry["evidence"]["message_id"]) == (
        "revoked",
        "inbound_keyword",
        " baja ",
        "wamid.stop",
    )
    response, _ = submit(db, ready, intent(channels=["whatsapp"]))
    assert response["deliveries"][0]["reason"] == "no_consent"


def test_an_ordinary_inbound_message_changes_no_consent(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    out = db.execute(
        INGEST,
        (
            "in-3",
            Jsonb(
                [
                    {
                        "phone_number_id": "106540352242922",
                        "sender": "34600111222",
                        "message_id": "m",
                        "text": "stop by later?",
                        "received_at": None,
                    }
                ]
            ),
        ),
    ).fetchone()[0]
    assert out["outcomes"][0]["outcome"] == "window_opened"
    assert len(call(db, "notify_api.list_consents_v1(%s, 'runner-42')", ready)["history"]) == 1


def test_an_opt_out_keyword_from_an_unknown_sender_revokes_nothing(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    out = db.execute(
        INGEST,
        (
            "in-4",
            Jsonb(
                [
                    {
                        "phone_number_id": "106540352242922",
                        "sender": "34999999999",
                        "message_id": "m",
                        "text": "STOP",
                        "received_at": None,
                    }
                ]
            ),
        ),
    ).fetchone()[0]
    assert out["outcomes"][0]["outcome"] == "opt_out_unknown_sender"
