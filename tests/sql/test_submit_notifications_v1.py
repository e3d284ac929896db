"""notify_api.submit_notifications_v1: a batch of independent intents, each item succeeding or failing alone."""

from __future__ import annotations

import datetime as dt
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import REMINDER, call, intent, submit
from tests.sql.test_submit_notification_v1__fanout import batch


def test_a_batch_reports_each_item_in_order_and_a_bad_one_rejects_no_other(db, ready):
    items = [
        {
            "idempotency_key": f"b-{i}",
            "notification": intent(recipient={"ref": f"r-{i}", "addresses": {"email": f"r{i}@example.com"}}, channels=["email"]),
        }
        for i in range(5)
    ]
    items[2]["notification"]["template"] = "missing"
    items[3] = {"idempotency_key": "b-3", "notification": {**items[3]["notification"], "colour": "red"}}
    out = batch(db, ready, items)
    assert [(i["index"], i["outcome"], i["status"]) for i in out["items"]] == [
        (0, "accepted", 202),
        (1, "accepted", 202),
        (2, "error", 422),
        (3, "error", 400),
        (4, "accepted", 202),
    ]
    assert out["items"][2]["error"] == {
        "type": "template_not_found",
        "field": "template",
        "detail": "template missing has no email content for locale en or its fallbacks",
    }
    assert out["items"][3]["error"]["field"] == "colour"
    assert (out["accepted"], out["replayed"], out["failed"]) == (3, 0, 2)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 3
    assert db.execute("select count(*) from notify.recipients where ref in ('r-2', 'r-3')").fetchone()[0] == 0
    again = batch(db, ready, items[:2])
    assert [i["outcome"] for i in again["items"]] == ["replayed", "replayed"]
    assert again["items"][0]["body"] == out["items"][0]["body"]


def test_batch_limits_and_shapes(db, ready):
    with pytest.raises(psycopg.Error) as info:
        batch(db, ready, [])
    assert info.value.diag.column_name == "items"
    out = batch(db, ready, [{"notification": "nope"}, {"idempotency_key": 5, "notification": intent()}])
    assert [i["status"] for i in out["items"]] == [400, 400]


def test_a_batch_respects_consent_per_item(db, ready):
    out = batch(
        db,
        ready,
        [
            {"notification": intent(channels=["whatsapp"])},
            {
                "notification": intent(
                    channels=["whatsapp"], recipient={"ref": "stranger", "addresses": {"whatsapp": "+34600999000"}}
                )
            },
        ],
    )
    statuses = [i["body"]["deliveries"][0]["status"] for i in out["items"]]
    assert statuses == ["queued", "suppressed"]


def _twin_tenant(db: psycopg.Connection) -> str:
    twin = str(call(db, "notify_api.create_tenant_v1('twin', 'Twin', 'en')")["id"])
    call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", twin, Jsonb(REMINDER))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        twin,
        Jsonb({"channel": "whatsapp", "status": "granted", "source": "signup_form"}),
    )
    return twin


def _shape(response: dict) -> object:
    if "summary" in response:
        return response["status"], response["summary"]
    return response["status"], [(d["channel"], d["status"], d.get("reason")) for d in response["deliveries"]]


def _state(db: psycopg.Connection, tenant: str) -> object:
    deliveries = db.execute(
        "select r.ref, d.channel, d.status, d.reason, d.address, d.template_locale, d.priority, d.route_step, d.route_until,"
        " d.route_within, d.due_at = 'infinity' from notify.notification_deliveries d"
        " join notify.recipients r on r.tenant_id = d.tenant_id and r.id = d.recipient_id where d.tenant_id = %s order by 1, 2",
        (tenant,),
    ).fetchall()
    requests = db.execute(
        "select idempotency_key, template_key, variables, category, metadata, recipient_count, priority, route, channels"
        " from notify.notification_requests"
        " where tenant_id = %s order by 1, 2, 3::text",
        (tenant,),
    ).fetchall()
    addresses = db.execute(
        "select r.ref, r.locale, r.timezone, a.channel, a.address from notify.recipients r"
        " left join notify.recipient_addresses a on a.tenant_id = r.tenant_id and a.recipient_id = r.id"
        " where r.tenant_id = %s order by 1, 4",
        (tenant,),
    ).fetchall()
    return deliveries, requests, addresses


def test_a_batch_answers_and_writes_as_its_items_one_by_one_would(db, ready):
    """The usual items are taken together (notify._submit_batch_usual), the others alone: a mixed batch must answer and
    write exactly what submitting its items one by one does, in order, on a twin tenant."""

    def one(ref: str, **changes: object) -> dict:
        return intent(
            **{"recipient": {"ref": ref, "addresses": {"email": f"{ref}@example.com"}}, "channels": ["email"], **changes}
        )

    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat()
    items = [
        {"idempotency_key": "k0", "notification": intent()},
        {"idempotency_key": "k1", "notification": one("r-1")},
        {"idempotency_key": "k2", "notification": one("r-2", variables={"name": "Ana"})},
        {"idempotency_key": "k3", "notification": one("r-3", template="missing")},
        {"idempotency_key": "dup", "notification": one("r-4")},
        {"idempotency_key": "dup", "notification": one("r-4")},
        {"idempotency_key": "dup2", "notification": one("r-6")},
        {"idempotency_key": "dup2", "notification": one("r-7")},
        {"idempotency_key": "k8", "notification": one("r-8", send_at=later)},
        {
            "idempotency_key": "k9",
            "notification": {
                **one("x"),
                "recipient": None,
                "recipients": [{"ref": "r-9", "addresses": {"email": "r9@example.com"}}, {"ref": "r-1"}],
            },
        },
        {"idempotency_key": "k10", "notification": intent(recipient={"ref": "r-10", "addresses": {"email": "nope@"}})},
        {"idempotency_key": "k11", "notification": intent(recipient={"ref": "r-11", "timezone": "Europe/Madrid"})},
        {"idempotency_key": "k12", "notification": {**one("r-12"), "colour": "red"}},
        {"idempotency_key": "k13", "notification": one("r-13", channels=["email", "email"])},
        {
            "idempotency_key": "k14",
            "notification": intent(recipient={"ref": "r-14", "locale": "es-ES", "addresses": {"email": "r14@example.com"}}),
        },
        {"idempotency_key": "k15", "notification": one("r-15", category="marketing", metadata={"run": 7})},
        {"notification": one("r-16")},
        {
            "idempotency_key": "k17",
            "notification": intent(recipient={"ref": "r-17", "addresses": {"email": None, "whatsapp": "+34600111333"}}),
        },
        {"idempotency_key": "before", "notification": one("r-18")},
        {"idempotency_key": "k19", "notification": one("r-19", channels=["whatsapp", "email", "sms"])},
        # review (round 13): edge cases of the usual-path predicate and of the set-based writes
        {"idempotency_key": "k20", "notification": one("r-20", template="")},
        {"idempotency_key": "k21", "notification": one("r-21", template="t" * 101)},
        {"idempotency_key": "k22", "notification": one("r-22", category="c" * 101)},
        {"idempotency_key": "k23", "notification": one("r-23", category=7)},
        {"idempotency_key": "k24", "notification": one("r-24", variables=["name"])},
        {"idempotency_key": "k25", "notification": one("r-25", metadata="x")},
        {"idempotency_key": "k26", "notification": one("r-26", channels=["pager"])},
        {"idempotency_key": "k27", "notification": one("r-27", channels=[])},
        {"idempotency_key": "k28", "notification": one("r-28", channels="email")},
        {"idempotency_key": "k29", "notification": one("r-29", channels=[["email"]])},
        {"idempotency_key": "k30", "notification": one("r-30", template=["event_reminder"])},
        {"idempotency_key": "clé-31", "notification": one("r-31")},
        {"idempotency_key": "k 32", "notification": one("r-32")},
        {"idempotency_key": "", "notification": one("r-33")},
        {"idempotency_key": "k35", "notification": intent(recipient={"ref": "", "addresses": {"email": "e@example.com"}})},
        {"idempotency_key": "k36", "notification": intent(recipient={"ref": "ü" * 200, "addresses": {"email": "u@example.com"}})},
        {"idempotency_key": "k37", "notification": intent(recipient={"ref": "ü" * 201})},
        {"idempotency_key": "k38", "notification": intent(recipient={"ref": 38})},
        {"idempotency_key": "k39", "notification": intent(recipient={"ref": "r-39", "addresses": {"pager": "x"}})},
        {"idempotency_key": "k40", "notification": intent(recipient={"ref": "r-40", "addresses": ["e@example.com"]})},
        {"idempotency_key": "k41", "notification": intent(recipient={"ref": "r-41", "addresses": {"email": 41}})},
        {
            "idempotency_key": "k42",
            "notification": intent(recipient={"ref": "r-42", "addresses": {"whatsapp": "US.13491208655302741918"}}),
        },
        {"idempotency_key": "k43", "notification": intent(recipient={"ref": "r-43", "locale": "es-MX"}, channels=["sms"])},
        {"idempotency_key": "k44", "notification": intent(recipient={"ref": "r-44", "locale": "x"})},
        {"idempotency_key": "k45", "notification": intent(recipient={"ref": "r-45", "locale": 45})},
        {"idempotency_key": "k46", "notification": intent(recipient={"ref": "r-46", "colour": "red"})},
        {"idempotency_key": "k47", "notification": one("known-addr", channels=["email", "sms"])},
        {"idempotency_key": "k48", "notification": intent(recipient={"ref": "known-locale", "locale": "es"}, channels=["email"])},
        {"idempotency_key": "k49", "notification": one("opted-out")},
        {"idempotency_key": "k50", "notification": one("market", category="marketing", channels=["email", "whatsapp"])},
        {"idempotency_key": "k51", "notification": intent(recipient={"ref": "r-51", "addresses": {"email": "gone@example.com"}})},
        {"idempotency_key": "k52", "notification": {**one("r-52"), "variables": None, "metadata": None, "category": None}},
        {"idempotency_key": "k53", "notification": {**one("r-53"), "recipient": [{"ref": "r-53"}]}},
        {"idempotency_key": "k54", "notification": one("r-54", variables={"name": None, "event": {"x": [1]}})},
        {"idempotency_key": "k55", "notification": one("r-55", channels=["email", "sms", "email"])},
        {"idempotency_key": "k56", "notification": intent(recipient={"ref": "r-56", "timezone": None, "locale": None})},
        {"idempotency_key": "k57", "notification": one("r-57", expires_at=None)},
        {"idempotency_key": "k58", "notification": one("r-58", callback_url=None)},
        {"idempotency_key": None, "notification": one("r-61")},
        # issue #14: priority (in the usual path when valid) and route (item by item)
        {"idempotency_key": "k62", "notification": one("r-62", priority="high")},
        {"idempotency_key": "k63", "notification": one("r-63", priority="bulk")},
        {"idempotency_key": "k64", "notification": one("r-64", priority=None)},
        {"idempotency_key": "k65", "notification": one("r-65", priority="urgent")},
        {"idempotency_key": "k66", "notification": one("r-66", priority=1)},
        {"idempotency_key": "k67", "notification": one("r-67", priority="HIGH")},
        {
            "idempotency_key": "k68",
            "notification": {
                **intent(recipient={"ref": "r-68", "addresses": {"email": "r68@example.com", "whatsapp": "+34600111668"}}),
                "channels": None,
                "route": [{"channel": "whatsapp", "until": "delivered", "within": "PT15M"}, {"channel": "email"}],
                "priority": "high",
            },
        },
        {
            "idempotency_key": "k69",
            "notification": {**one("r-69"), "route": [{"channel": "email"}]},
        },
        {
            "idempotency_key": "k70",
            "notification": {**one("r-70"), "channels": None, "route": [{"channel": "email", "within": "PT0S"}]},
        },
    ]
    for item in items:
        if item["notification"].get("recipient") is None:
            item["notification"].pop("recipient", None)
        if "route" in item["notification"] and item["notification"].get("channels") is None:
            item["notification"].pop("channels", None)
    twin = _twin_tenant(db)
    for tenant in (ready, twin):
        submit(db, tenant, one("r-18"), "before")
        call(db, "notify_api.upsert_recipient_v1(%s, 'r-17', %s)", tenant, Jsonb({"addresses": {"email": "old@example.com"}}))
        call(
            db,
            "notify_api.upsert_recipient_v1(%s, 'known-addr', %s)",
            tenant,
            Jsonb({"addresses": {"email": "old-known@example.com", "sms": "+34600111444"}}),
        )
        call(
            db,
            "notify_api.upsert_recipient_v1(%s, 'known-locale', %s)",
            tenant,
            Jsonb({"locale": "en-GB", "timezone": "Europe/London"}),
        )
        call(
            db,
            "notify_api.upsert_recipient_v1(%s, 'opted-out', %s)",
            tenant,
            Jsonb({"addresses": {"email": "opted-out@example.com"}}),
        )
        call(
            db,
            "notify_api.record_consent_v1(%s, 'opted-out', %s)",
            tenant,
            Jsonb({"channel": "email", "status": "revoked", "source": "unsubscribe_link"}),
        )
        call(
            db,
            "notify_api.record_consent_v1(%s, 'market', %s)",
            tenant,
            Jsonb({"channel": "whatsapp", "status": "granted", "source": "signup_form", "category": "marketing"}),
        )
        # an erased recipient's opt-out stays with its address (the suppression list)
        call(db, "notify_api.upsert_recipient_v1(%s, 'erased', %s)", tenant, Jsonb({"addresses": {"email": "gone@example.com"}}))
        call(
            db,
            "notify_api.record_consent_v1(%s, 'erased', %s)",
            tenant,
            Jsonb({"channel": "email", "status": "revoked", "source": "unsubscribe_link"}),
        )
        call(db, "notify_api.erase_recipient_v1(%s, 'erased')", tenant)

    out = batch(db, ready, items)
    expected = []
    for item in items:
        try:
            with db.transaction():
                response, replayed = submit(db, twin, item["notification"], item.get("idempotency_key"))
            expected.append(("replayed" if replayed else "accepted", _shape(response)))
        except psycopg.Error as error:
            expected.append(("error", (error.diag.constraint_name, error.diag.column_name, error.diag.message_primary)))
    got = [
        (i["outcome"], (i["error"]["type"], i["error"].get("field", ""), i["error"]["detail"]))
        if i["outcome"] == "error"
        else (i["outcome"], _shape(i["body"]))
        for i in out["items"]
    ]
    assert [i["index"] for i in out["items"]] == list(range(len(items)))
    assert got == expected
    assert _state(db, ready) == _state(db, twin)


def test_a_large_usual_batch_is_taken_set_based_and_wakes_once(db, ready):
    items = [
        {
            "idempotency_key": f"big-{i}",
            "notification": intent(recipient={"ref": f"m-{i}", "addresses": {"email": f"m{i}@example.com"}}, channels=["email"]),
        }
        for i in range(1000)
    ]
    out = batch(db, ready, items)
    assert (out["accepted"], out["failed"]) == (1000, 0)
    assert db.execute("select count(*) from notify.notification_deliveries where status = 'queued'").fetchone()[0] == 1000
    assert (
        db.execute("select count(*) from public.procrastinate_jobs where task_name = 'dispatch' and status = 'todo'").fetchone()[
            0
        ]
        == 1
    )
    assert (
        db.execute(
            "select count(distinct d.id) from notify.delivery_events e"
            " join notify.notification_deliveries d on d.id = e.delivery_id"
        ).fetchone()[0]
        == 1000
    )


def test_a_batch_racing_another_with_the_same_key_replays_it(db, ready, connect):
    """Two batches with the same key at once: the second waits at the key, then answers the first's stored answer (as
    an item submitted alone would), and writes no delivery of its own."""
    items = [
        {
            "idempotency_key": "race-k",
            "notification": intent(recipient={"ref": "c-1", "addresses": {"email": "c1@example.com"}}, channels=["email"]),
        },
        {
            "idempotency_key": "race-other",
            "notification": intent(recipient={"ref": "c-2", "addresses": {"email": "c2@example.com"}}, channels=["email"]),
        },
    ]
    first = connect()
    one = first.execute("select notify_api.submit_notifications_v1(%s, %s)", (ready, Jsonb(items[:1]))).fetchone()[0]
    second = connect(autocommit=True)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["out"] = second.execute(
                "select notify_api.submit_notifications_v1(%s, %s)", (ready, Jsonb(items))
            ).fetchone()[0]
        except Exception as error:  # noqa: BLE001 - reported below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    for _ in range(500):
        if db.execute(
            "select count(*) from pg_stat_activity where pid = %s and wait_event_type = 'Lock'", (second.info.backend_pid,)
        ).fetchone()[0]:
            break
        time.sleep(0.01)
    first.commit()
    thread.join()
    assert "error" not in outcome, outcome
    out = outcome["out"]
    assert [(i["outcome"], i["status"]) for i in out["items"]] == [("replayed", 200), ("accepted", 202)]
    assert out["items"][0]["body"] == one["items"][0]["body"]
    assert (
        db.execute(
            "select count(*) from notify.notification_deliveries d join notify.notification_requests r on r.id = d.request_id"
            " where r.idempotency_key = 'race-k'"
        ).fetchone()[0]
        == 1
    )
