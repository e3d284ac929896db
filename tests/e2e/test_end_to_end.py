"""The whole path with real processes: HTTP submit -> worker -> mock provider -> signed webhook -> status.

`dispatcher serve` and `dispatcher worker` (or `procrastinate --app=runner.app.app worker`) run as
subprocesses on a fresh database; the mock provider posts its status reports over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import REMINDER, ROOT, Service, call, intent, start_service, stop_service, submit, url_of

pytestmark = pytest.mark.slow

FAILS = "+34600000001"
RETRIES = "retry@example.com"
TIMES_OUT = "+34600000002"
ASYNC_FAIL = "+34600000003"


def setup_tenant(svc: Service) -> None:
    with svc.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        for ref in ("runner-42", "r-fail", "r-timeout", "r-async"):
            assert (
                c.post(
                    f"/internal/recipients/{ref}/consents",
                    json={"channel": "whatsapp", "status": "granted", "source": "signup_form"},
                ).status_code
                == 201
            )


def final(body: dict) -> bool:
    return body["status"] == "completed" and all(
        d["status"] in ("read", "delivered", "failed", "unknown", "suppressed") for d in body["deliveries"]
    )


@pytest.fixture
def svc(db: psycopg.Connection, tmp_path) -> Service:  # noqa: ANN001
    outcomes = {FAILS: "failed", RETRIES: "retry", TIMES_OUT: "unknown", ASYNC_FAIL: "async_failed"}
    service = start_service(url_of(db), tmp_path, {"DISPATCHER_MOCK_OUTCOMES": json.dumps(outcomes)})
    setup_tenant(service)
    yield service
    stop_service(service)


def test_submit_to_delivered_and_read_over_http(svc: Service) -> None:
    started = time.monotonic()
    with svc.client() as c:
        accepted = c.post("/internal/notifications", json=intent(), headers={"Idempotency-Key": "e2e-1"})
        assert accepted.status_code == 202
        notification = accepted.json()
    body = svc.wait_for(notification["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"read", "delivered"})
    elapsed = time.monotonic() - started
    by_channel = {d["channel"]: d for d in body["deliveries"]}
    assert by_channel["whatsapp"]["status"] == "read" and by_channel["email"]["status"] == "delivered"
    for d in body["deliveries"]:
        assert d["attempts"] == 1 and d["provider"] == "mock" and d["provider_message_id"].startswith("mock-")
        assert d["sent_at"] and d["delivered_at"] and d["attempt_history"][0]["outcome"] == "sent"
        sources = [e["source"] for e in d["events"]]
        assert sources[:2] == ["submit", "claim"] and "webhook" in sources
    assert [e["to"] for e in by_channel["whatsapp"]["events"]] == ["queued", "sending", "sent", "delivered", "read"]
    with svc.client() as c:
        sent = c.get("/internal/mock/messages", params={"delivery_id": by_channel["email"]["id"]}).json()
    assert sent[0]["rendered"]["subject"] == "Reminder: Long run" and "&lt;" not in sent[0]["rendered"]["text"]
    assert elapsed < 15
    print(f"\nsubmit -> read in {elapsed:.2f}s")


def test_the_mock_reports_a_read_only_where_the_channel_has_reads(svc: Service) -> None:
    """The channel rules live in the database (notify._channel_rules); the worker reads them, and its mock reports
    WhatsApp read but SMS only delivered (SMS has no reads)."""
    with svc.client() as c:
        assert (
            c.post(
                "/internal/recipients/runner-42/consents", json={"channel": "sms", "status": "granted", "source": "signup_form"}
            ).status_code
            == 201
        )
        body = intent(recipient={"ref": "runner-42", "addresses": {"whatsapp": "+34600111222", "sms": "+34600111222"}})
        body["channels"] = ["whatsapp", "sms"]
        accepted = c.post("/internal/notifications", json=body)
        assert accepted.status_code == 202, accepted.text
    done = svc.wait_for(accepted.json()["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"read", "delivered"})
    by_channel = {d["channel"]: d for d in done["deliveries"]}
    assert (by_channel["whatsapp"]["status"], by_channel["sms"]["status"]) == ("read", "delivered")
    with psycopg.connect(svc.db_url, autocommit=True) as conn:

        def reported(delivery_id: str) -> list[str]:
            return [
                r[0]
                for r in conn.execute(
                    "select o ->> 'status' from notify.webhook_events w cross join lateral jsonb_array_elements(w.outcomes) o"
                    " where o ->> 'delivery_id' = %s order by w.received_at",
                    (delivery_id,),
                )
            ]

        deadline = time.monotonic() + 10
        while "read" not in reported(by_channel["whatsapp"]["id"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the mock scheduled both messages' reports together: the SMS's last one came before WhatsApp's read
        assert sorted(reported(by_channel["sms"]["id"])) == ["delivered", "sent"]


def test_one_tenants_slow_provider_holds_up_only_its_own_outcomes(svc: Service) -> None:
    """Two tenants' deliveries due at the same moment are claimed in one batch. Tenant A's goes to the mock's slow
    address (its answer takes SLOW_SECONDS); tenant B's outcome is recorded as soon as B's own provider call answers,
    while A's is still sending (one provider call per tenant, each wave of outcomes recorded at once)."""
    import datetime as dt

    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        other = str(call(conn, "notify_api.create_tenant_v1('globex', 'Globex', 'en')")["id"])
        call(conn, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", other, Jsonb(REMINDER))
        due = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()
        ids = {}
        for tenant, address in ((svc.tenant_id, "slow@simulator.dispatcher.test"), (other, "ana@globex.example")):
            body = intent(recipient={"ref": "r-slow", "addresses": {"email": address}}, channels=["email"], send_at=due)
            ids[tenant] = submit(conn, tenant, body)[0]["deliveries"][0]["id"]

        def status(tenant: str) -> str:
            return conn.execute(
                "select status::text from notify.notification_deliveries where tenant_id = %s and id = %s", (tenant, ids[tenant])
            ).fetchone()[0]

        deadline = time.monotonic() + 20
        while status(other) in ("scheduled", "queued", "sending"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert status(other) in ("sent", "delivered")
        assert status(svc.tenant_id) == "sending"  # A's slow call has not answered yet (the mock takes 2 s)
        # they were one batch: claimed by the same claim (the same lease), one attempt each
        attempts = conn.execute(
            "select count(distinct started_at) from notify.delivery_attempts where delivery_id = any(%s::uuid[])",
            (list(ids.values()),),
        ).fetchone()[0]
        assert attempts == 1
        while status(svc.tenant_id) == "sending":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status(svc.tenant_id) in ("sent", "delivered")


def test_failure_classes_end_in_their_documented_states(svc: Service) -> None:
    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        call(conn, "notify_api.set_retry_policy_v1(%s, 3, 50, 200)", svc.tenant_id)
    cases = {
        "r-fail": ({"whatsapp": FAILS}, ["whatsapp"], "failed", "provider_rejected"),
        "r-retry": ({"email": RETRIES}, ["email"], "failed", "retries_exhausted"),
        "r-timeout": ({"whatsapp": TIMES_OUT}, ["whatsapp"], "unknown", "outcome_unknown"),
        "r-async": ({"whatsapp": ASYNC_FAIL}, ["whatsapp"], "failed", "provider_reported"),
    }
    ids = {}
    with svc.client() as c:
        for ref, (addresses, channels, _, _) in cases.items():
            response = c.post(
                "/internal/notifications", json=intent(recipient={"ref": ref, "addresses": addresses}, channels=channels)
            )
            assert response.status_code == 202, response.text
            ids[ref] = response.json()["id"]
    for ref, (_, _, status, reason) in cases.items():
        body = svc.wait_for(
            ids[ref], lambda b, s=status: b["deliveries"][0]["status"] == s and (s != "failed" or b["status"] == "completed")
        )
        delivery = body["deliveries"][0]
        assert (delivery["status"], delivery["reason"]) == (status, reason), delivery
    retried = svc.wait_for(ids["r-retry"], final)["deliveries"][0]
    assert retried["attempts"] == 3 and [a["outcome"] for a in retried["attempt_history"]] == ["retry"] * 3
    assert retried["error"] == {"code": "mock_503", "message": "mock provider unavailable"}


def test_send_at_holds_the_message_until_then(svc: Service) -> None:
    send_at = time.time() + 2.5
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(send_at)) + f".{int(send_at % 1 * 1000):03d}Z"
    with svc.client() as c:
        created = c.post("/internal/notifications", json=intent(channels=["email"], send_at=iso)).json()
        assert created["deliveries"][0]["status"] == "scheduled"
        time.sleep(1.0)
        assert c.get(f"/internal/notifications/{created['id']}").json()["deliveries"][0]["status"] == "scheduled"
    body = svc.wait_for(created["id"], lambda b: b["deliveries"][0]["status"] == "delivered")
    sent_at = body["deliveries"][0]["attempt_history"][0]["started_at"]
    assert sent_at >= iso.replace("Z", "")[:19]


def test_direct_sql_submission_exists_only_if_the_callers_transaction_commits(svc: Service) -> None:
    """A trusted service calls the SQL function inside its own business transaction, as the notify_caller role."""
    with psycopg.connect(svc.db_url) as conn:
        conn.execute("set role notify_caller")
        conn.execute("select * from notify_api.submit_notification_v1(%s, %s, 'sql-rollback')", (svc.tenant_id, Jsonb(intent())))
        conn.rollback()  # the business change failed: no notification, nothing sent
        conn.execute("set role notify_caller")
        row = conn.execute(
            "select response from notify_api.submit_notification_v1(%s, %s, 'sql-commit')",
            (svc.tenant_id, Jsonb(intent(channels=["email"]))),
        ).fetchone()
        conn.commit()  # committed: the worker is woken by the commit's NOTIFY
    notification_id = row[0]["id"]
    body = svc.wait_for(notification_id, lambda b: b["deliveries"][0]["status"] == "delivered")
    assert body["idempotency_key"] == "sql-commit"
    with psycopg.connect(svc.db_url) as conn:
        keys = [r[0] for r in conn.execute("select idempotency_key from notify.notification_requests")]
        assert keys == ["sql-commit"]


def test_logs_and_job_arguments_hold_no_personal_data(svc: Service) -> None:
    with svc.client() as c:
        created = c.post("/internal/notifications", json=intent()).json()
    svc.wait_for(created["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"read", "delivered"})
    with psycopg.connect(svc.db_url) as conn:
        args = json.dumps([r[0] for r in conn.execute("select args from procrastinate_jobs")])
    text = svc.log_text() + args
    for secret in ("+34600111222", "34600111222", "ana@example.com", "Long run", svc.key):
        assert secret not in text, secret
    assert "webhook ingested" in svc.log_text()


def test_the_request_id_reaches_the_notification_and_the_workers_log_lines(svc: Service) -> None:
    with svc.client() as c:
        given = c.post("/internal/notifications", json=intent(), headers={"X-Request-ID": "runflow-req-7f3a"})
        assert given.headers["x-request-id"] == "runflow-req-7f3a"
        made = c.post(
            "/internal/notifications",
            json=intent(variables={"name": "Bo", "event": "x"}),
            headers={"X-Request-ID": "bad id with spaces"},
        )
        created_id = made.headers["x-request-id"]
        assert created_id != "bad id with spaces" and len(created_id) == 32  # refused and replaced by a fresh one
        assert c.get("/health").headers["x-request-id"]
    body = svc.wait_for(given.json()["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"read", "delivered"})
    assert body["http_request_id"] == "runflow-req-7f3a"
    assert svc.wait_for(made.json()["id"], lambda b: True)["http_request_id"] == created_id
    lines = [json.loads(line) for line in svc.log_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "runflow-req-7f3a"]
    api_lines = [line for line in mine if line["logger"] == "api.access"]
    worker_lines = [line for line in mine if line["event"] == "delivery attempted"]
    assert api_lines and api_lines[0]["status"] == 202 and api_lines[0]["path"] == "/internal/notifications"
    delivery_ids = {d["id"] for d in body["deliveries"]}
    assert {line["delivery_id"] for line in worker_lines} == delivery_ids
    assert all(line["outcome"] == "sent" and "address" not in line for line in worker_lines)
    with psycopg.connect(svc.db_url) as conn:  # direct SQL callers set it as a transaction setting
        with conn.transaction():
            conn.execute("select set_config('notify.request_id', 'sql-caller-1', true)")
            response, _ = submit(conn, svc.tenant_id, intent(variables={"name": "Cy", "event": "y"}))
        stored = conn.execute(
            "select http_request_id from notify.notification_requests where id = %s", (response["id"],)
        ).fetchone()[0]
    assert stored == "sql-caller-1"


def worker_log_events(path) -> list[dict]:  # noqa: ANN001
    """Every line the worker wrote, each parsed as JSON (a plain-text line fails the test)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name}: not a JSON log line: {line!r}") from None
    return events


@pytest.mark.parametrize(
    "entry_point",
    [["-m", "dispatcher", "worker"], ["-m", "procrastinate", "--app=runner.app.app", "worker"]],
    ids=["dispatcher-worker", "procrastinate-cli"],
)
def test_both_worker_entry_points_run_the_same_worker(entry_point: list[str], db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    """`procrastinate --app=runner.app.app worker` is what `dispatcher worker` is: JSON logs, masked, and metrics."""
    from tests.conftest import free_port

    service = start_service(url_of(db), tmp_path)
    worker = service.procs.pop()
    worker.terminate()
    worker.wait(30)
    metrics_port = free_port()
    log = tmp_path / "entry-point.log"
    service.procs.append(
        subprocess.Popen(
            [sys.executable, *entry_point],
            env={**service.env, "DISPATCHER_WORKER_METRICS_PORT": str(metrics_port)},
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
    )
    service.logs.append(log)
    try:
        setup_tenant(service)
        with service.client() as c:
            created = c.post("/internal/notifications", json=intent()).json()
        body = service.wait_for(created["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"read", "delivered"})
        assert body["status"] == "completed"
        import httpx

        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'dispatcher_deliveries_total{channel="email"' in scraped
    finally:
        stop_service(service)
    events = worker_log_events(log)
    attempts = [e for e in events if e["event"] == "delivery attempted"]
    assert {e["channel"] for e in attempts} == {"whatsapp", "email"}, events
    text = log.read_text()
    assert "+34600111222" not in text and "ana@example.com" not in text


def test_sigterm_lets_in_flight_sends_finish_and_records_them(db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    """SIGTERM (systemd stop, Cloud Run scale-in) while 20 sends are in flight at the provider: the worker waits for
    them, records every outcome, and exits cleanly; nothing is left `sending` and nothing is sent twice."""
    service = start_service(url_of(db), tmp_path, {"DISPATCHER_MOCK_LATENCY_MS": "1500", "DISPATCHER_MOCK_WEBHOOK_SECRET": ""})
    try:
        setup_tenant(service)
        with service.client() as c:
            ids = [
                c.post(
                    "/internal/notifications",
                    json=intent(
                        channels=["email"],
                        variables={"name": f"N{n}", "event": "x"},
                        recipient={"ref": f"sig-{n}", "addresses": {"email": f"s{n}@example.com"}},
                    ),
                ).json()["id"]
                for n in range(20)
            ]
        with psycopg.connect(service.db_url, autocommit=True) as conn:
            deadline = time.monotonic() + 15
            while conn.execute("select count(*) from notify.notification_deliveries where status = 'sending'").fetchone()[0] < 20:
                assert time.monotonic() < deadline, "the sends did not start"
                time.sleep(0.05)
            worker = service.procs.pop()
            worker.terminate()  # SIGTERM while every send is at the provider
            code = worker.wait(30)
            statuses = conn.execute("select status, count(*) from notify.notification_deliveries group by 1").fetchall()
            attempts = conn.execute(
                "select count(*), count(*) filter (where outcome = 'sent') from notify.delivery_attempts"
            ).fetchone()
            sent_by_mock = conn.execute("select count(*) from notify.mock_messages").fetchone()[0]
        assert code == 0, service.log_text()[-2000:]
        assert statuses == [("sent", 20)] and attempts == (20, 20) and sent_by_mock == 20
        print(f"\nSIGTERM with 20 sends in flight: worker exited {code}; 20 of 20 recorded sent, 0 left sending, 0 resent")
        assert len(ids) == 20
    finally:
        stop_service(service)


def test_a_killed_worker_follows_the_crash_policy(db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    """SIGKILL while both sends are in flight: e-mail is sent again, WhatsApp becomes unknown (never resent),
    and the dead worker's stalled job is closed."""
    service = start_service(
        url_of(db),
        tmp_path,
        {"DISPATCHER_MOCK_LATENCY_MS": "20000", "DISPATCHER_LEASE_SECONDS": "3", "DISPATCHER_MAINTENANCE_CRON": "* * * * * *"},
    )
    try:
        setup_tenant(service)
        with service.client() as c:
            created = c.post("/internal/notifications", json=intent()).json()
        service.wait_for(created["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"sending"})
        doomed = service.procs.pop()
        doomed.kill()  # SIGKILL: no graceful shutdown, no record_attempts
        doomed.wait(10)
        with psycopg.connect(service.db_url, autocommit=True) as conn:
            # (a spare 'todo' wake-up may exist too: maintenance can wake a channel between submit and claim)
            assert "doing" in {
                r[0] for r in conn.execute("select status::text from procrastinate_jobs where task_name = 'dispatch'")
            }
            conn.execute("update procrastinate_workers set last_heartbeat = now() - interval '1 hour'")  # as if 30 s had passed
        log = tmp_path / "worker2.log"
        env = {**service.env, "DISPATCHER_MOCK_LATENCY_MS": "0"}
        service.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dispatcher", "worker"], env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT
            )
        )
        service.logs.append(log)
        body = service.wait_for(
            created["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"unknown", "delivered"}, timeout=30
        )
        by_channel = {d["channel"]: d for d in body["deliveries"]}
        assert by_channel["whatsapp"]["reason"] == "lease_expired" and by_channel["whatsapp"]["attempts"] == 1
        assert [a["outcome"] for a in by_channel["email"]["attempt_history"]] == ["lease_expired", "sent"]
        with psycopg.connect(service.db_url) as conn:
            sends = dict(conn.execute("select channel::text, count(*) from notify.mock_messages group by 1").fetchall())
            assert sends == {"email": 1}  # WhatsApp never sent twice (here: never reached the mock)
            deadline = time.monotonic() + 10
            while conn.execute(
                "select count(*) from procrastinate_jobs where status = 'doing' and task_name = 'dispatch'"
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "the stalled job was not closed"
                time.sleep(0.2)
                conn.commit()
    finally:
        stop_service(service)


def test_metrics_from_the_api_and_the_worker(db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.conftest import free_port

    port, api_metrics = free_port(), free_port()
    receiver = ThreadingHTTPServer(
        ("127.0.0.1", 0),
        type(
            "Ok",
            (BaseHTTPRequestHandler,),
            {
                "do_POST": lambda self: (
                    self.rfile.read(int(self.headers["content-length"])),
                    self.send_response(204),
                    self.end_headers(),
                ),
                "log_message": lambda self, *a: None,
            },
        ),
    )
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    service = start_service(
        url_of(db),
        tmp_path,
        {"DISPATCHER_WORKER_METRICS_PORT": str(port), "DISPATCHER_DEV_MODE": "1", "DISPATCHER_METRICS_PORT": str(api_metrics)},
    )
    try:
        setup_tenant(service)
        with service.client() as c:
            assert (
                c.put("/internal/callbacks", json={"url": f"http://127.0.0.1:{receiver.server_address[1]}/cb"}).status_code == 200
            )
            created = c.post("/internal/notifications", json=intent()).json()
            service.wait_for(created["id"], lambda b: {d["status"] for d in b["deliveries"]} == {"read", "delivered"})
            deadline = time.monotonic() + 10
            while any(m["status"] != "delivered" for m in c.get(f"/internal/notifications/{created['id']}/callbacks").json()):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            c.post("/internal/notifications", json=intent(channels=["email"], send_at="2099-01-01T00:00:00Z"))
            assert c.get("/metrics").status_code == 404  # not on the public listener
        import httpx

        api = httpx.get(f"http://127.0.0.1:{api_metrics}/metrics", timeout=5).text
        worker = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        stop_service(service)
        receiver.shutdown()
        receiver.server_close()
    assert 'dispatcher_submissions_total{outcome="accepted",test="false"} 2.0' in api
    assert (
        'dispatcher_http_requests_total{app_name="dispatcher",method="POST",path="/internal/notifications",status_code="202"}'
        in api
    )
    assert 'dispatcher_webhook_events_total{outcome="applied",provider="mock"}' in api
    assert 'dispatcher_queue_scheduled{channel="email",tenant="acme"} 1.0' in api
    assert "dispatcher_queue_health_up 1.0" in api
    assert 'dispatcher_deliveries_total{channel="email",error_code="",outcome="sent",provider="mock",test="false"} 1.0' in worker
    assert "dispatcher_provider_call_seconds_bucket" in worker
    assert 'dispatcher_callbacks_total{outcome="delivered"}' in worker
    for family in ("due", "scheduled", "oldest_due_seconds", "sending", "leases_past_due", "unknown"):
        assert f"dispatcher_queue_{family}" in api
