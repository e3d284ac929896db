"""GET /internal/notifications (find, keyset pages) and GET /internal/notifications/{id}/deliveries over HTTP."""

from __future__ import annotations

from tests.api.test_api import client, is_problem  # noqa: F401  (fixture)
from tests.conftest import intent


def test_find_over_http_newest_first_by_pages(client):  # noqa: F811
    made = []
    for i in range(5):
        r = client.post("/internal/notifications", json=intent(metadata={"order": str(i)}), headers={"Idempotency-Key": f"f-{i}"})
        assert r.status_code == 202
        made.append(r.json()["id"])
    first = client.get("/internal/notifications", params={"recipient": "runner-42", "limit": 3})
    assert first.status_code == 200, first.text
    second = client.get(
        "/internal/notifications", params={"recipient": "runner-42", "limit": 3, "cursor": first.json()["next_cursor"]}
    )
    assert [i["id"] for i in first.json()["items"] + second.json()["items"]] == made[::-1]
    assert second.json()["next_cursor"] is None
    item = first.json()["items"][0]
    assert item["recipient"] == "runner-42" and {d["channel"] for d in item["deliveries"]} == {"whatsapp", "email"}
    by_key = client.get("/internal/notifications", params={"idempotency_key": "f-2"}).json()["items"]
    assert [i["id"] for i in by_key] == [made[2]]
    by_meta = client.get("/internal/notifications", params={"metadata_key": "order", "metadata_value": "4"}).json()["items"]
    assert [i["id"] for i in by_meta] == [made[4]]
    assert client.get("/internal/notifications", params={"status": "queued", "channel": "email"}).json()["items"]


def test_a_bad_filter_or_cursor_is_422_naming_it(client):  # noqa: F811
    is_problem(client.get("/internal/notifications", params={"status": "lost"}), 422, "status")
    is_problem(client.get("/internal/notifications", params={"created_to": "soon"}), 422, "created_to")
    is_problem(client.get("/internal/notifications", params={"cursor": "xyz"}), 422, "cursor")
    is_problem(client.get("/internal/notifications", params={"metadata_key": "a"}), 422, "metadata_value")


def test_an_admin_resolves_an_unknown_and_sets_the_deadline_over_http(client, db):  # noqa: F811
    from tests.conftest import claim

    client.post("/internal/notifications", json=intent(channels=["whatsapp"]), headers={"Idempotency-Key": "u-1"})
    row = claim(db, "whatsapp", lease=1)[0]
    db.execute("update notify.notification_deliveries set lease_expires_at = now() - interval '1 s'")
    db.execute("select notify_api.run_maintenance_v1()")
    is_problem(client.post(f"/internal/deliveries/{row[1]}/resolve", json={"status": "sent"}), 400)
    done = client.post(f"/internal/deliveries/{row[1]}/resolve", json={"status": "failed", "note": "rejected upstream"})
    assert done.status_code == 200 and done.json()["status"] == "failed"
    assert done.json()["events"][-1]["reason"] == "resolved: rejected upstream"
    is_problem(client.post(f"/internal/deliveries/{row[1]}/resolve", json={"status": "sent", "note": "x"}), 409, "status")
    put = client.put("/internal/channels/whatsapp/unknown-deadline", json={"after_seconds": 3600})
    assert put.status_code == 200 and put.json() == {"channel": "whatsapp", "after_seconds": 3600, "default": False}
    is_problem(client.put("/internal/channels/fax/unknown-deadline", json={"after_seconds": 3600}), 400, "channel")
